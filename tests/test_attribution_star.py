"""AtP* (method "atp*"), the verify deadline and the Arrow answer of POST /v1/attribution.

AtP* (Kramar et al. 2024) changes two things (engine/attribution.py):
- the QK fix: a query or key site's estimate recomputes its layer's attention softmax exactly with the
  clean query or key patched in and linearises only after it. Checked against an independent
  computation: the pattern the engine really computes with that query or key patched (the interventions'
  `patch` op, captured as `hook_pattern`), turned into the change of each head's output it causes
  (dP @ V), whose effect on the metric a central finite difference of real `add` interventions on
  `hook_z` measures. And on a constructed saturated-attention model (the last layer's queries scaled up
  so its softmax saturates), atp* is closer to real patching than atp on the query and key sites.
- GradDrop: sum over layers l of |estimate with the gradient through layer l's attention and MLP outputs
  dropped| / (L - 1). Checked against Hugging Face transformers with torch autograd (`detach()` at the
  same two points of each layer) for every site, position and head.
"""

from __future__ import annotations

import time

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest

from engine.api import Model
from engine.attribution import ARROW_STREAM, plan_attribution, run_attribution
from engine.interventions import sources_from
from tests.reference import assert_close
from tests.test_attribution import (CLEAN, CORRUPTED, DeltaEdit, _body, _one_torch_thread, _setup,  # noqa: F401
                                   arch, attribute, by_key, client, metric_of)  # the fixtures too
from tests.test_interventions import Reference


@pytest.fixture
def s(request, arch) -> dict:
    return _setup(request, arch)


def star(s: dict, sites, verify_top=None, metric=None) -> dict:
    return s["model"].attribute(clean={"prompt": s["clean"]}, corrupted={"prompt": s["corrupted"]},
                                metric=metric or s["metric"], sites=[{"layer_name": x} for x in sites],
                                method="atp*", verify_top=verify_top)


# --------------------------------------------------------------------------------------------
# The QK fix: the derivative of the metric along the head-output change the exact softmax causes
# --------------------------------------------------------------------------------------------
def head_output_change(s: dict, layer: int, site: str, position: int, head: int) -> np.ndarray:
    """Token-major [T, H, d]: (P_patched - P) @ V of layer `layer`, P_patched being the attention pattern the
    engine computes with `site` (its query or key) patched from the clean run at one position and head."""
    model = s["model"]
    pattern, values = f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"
    clean = model.generate(prompt=s["clean"], max_tokens=1, temperature=0, hooks=[{"layer_name": site}]).capture
    patch = {"layer_name": site, "op": "patch", "positions": [position], "heads": [head],
             "source": {"capture_id": clean.capture_id, "hook_id": site}}
    hooks = [{"layer_name": pattern}, {"layer_name": values}]
    plain = model.generate(prompt=s["corrupted"], max_tokens=1, temperature=0, hooks=hooks).activations
    patched = model.generate(prompt=s["corrupted"], max_tokens=1, temperature=0, hooks=hooks, interventions=[patch],
                             sources=sources_from(clean)).activations
    n = len(s["corrupted"])
    dp = (patched[pattern] - plain[pattern])[:n, :, :n].astype(np.float64)  # [T_q, H, T_k]
    v = plain[values][:n].astype(np.float64)  # [T_k, H_kv, d]
    n_heads, n_kv = dp.shape[1], v.shape[1]
    v = v[:, np.arange(n_heads) // (n_heads // n_kv)]  # [T_k, H, d]
    return np.einsum("qhk,khd->qhd", dp, v)


def directional_derivative(s: dict, site: str, change: np.ndarray, eps: float = 1e-2) -> float:
    """d metric / d e of `add`ing e * change[t] at each position t of `site` (a per-head site, token-major
    [T, H, d]): the sum over positions of Richardson-extrapolated central differences."""
    total = 0.0
    for t in range(change.shape[0]):
        if not np.abs(change[t]).max() > 1e-7:
            continue

        def moved(step: float) -> float:
            add = {"layer_name": site, "op": "add", "vector": (step * eps * change[t]).tolist(), "positions": [t]}
            return metric_of(s, [add])

        total += (8 * (moved(1.0) - moved(-1.0)) - (moved(2.0) - moved(-2.0))) / (12 * eps)
    return total


@pytest.mark.parametrize("component", ["q", "k"])
def test_qk_fix_is_linear_after_the_exact_softmax(s, component):
    layer = s["lm"].info.n_layers - 1
    site = f"blocks.{layer}.attn.hook_{component}"
    out = star(s, [site])
    rows = sorted(out["attributions"], key=lambda r: -abs(r["estimate"]))
    checked = 0
    for row in rows[:2]:
        change = head_output_change(s, layer, site, row["position"], row["head"])
        want = directional_derivative(s, f"blocks.{layer}.attn.hook_z", change)
        assert row["estimate"] == pytest.approx(want, rel=2e-3, abs=2e-4), (row, want)
        assert abs(want) > 1e-3, "not vacuous"
        checked += 1
    assert checked == 2


@pytest.mark.parametrize("name", sorted(__import__("tests.test_arch_zoo", fromlist=["QUICK"]).QUICK))
def test_qk_fix_on_every_family(name):
    """Sliding windows (gemma3, cohere2), attention sinks (gpt-oss: the sink's logit stays in the softmax),
    grouped KV heads, mixtures of experts, parallel blocks: the QK-fixed estimate of the last layer's largest
    query row and key row is the derivative along the head-output change of the real patched pattern.
    Multi-head latent attention has no exact per-head query or key to name (refused when planned)."""
    from engine.errors import UnknownHook
    from engine.model import load_model
    from tests.test_arch_zoo import zoo_model

    lm = load_model(str(zoo_model(name)), name)
    clean = lm.text_prompt("John gave Mary the book because she asked")
    # Two tokens near the end swapped: inside every sliding window, so the last query changes too.
    corrupted = [*clean[:-3], clean[-2], clean[-3], clean[-1]]
    s = {"lm": lm, "model": Model(lm), "clean": clean, "corrupted": corrupted,
         "metric": {"type": "logit_diff", "token_ids": [5, 9]}}
    layer = lm.info.n_layers - 1
    for component in ("q", "k"):
        site = f"blocks.{layer}.attn.hook_{component}"
        if name == "deepseek_v3":
            with pytest.raises(UnknownHook):
                star(s, [site])
            continue
        row = max(star(s, [site])["attributions"], key=lambda r: abs(r["estimate"]))
        change = head_output_change(s, layer, site, row["position"], row["head"])
        want = directional_derivative(s, f"blocks.{layer}.attn.hook_z", change)
        assert row["estimate"] == pytest.approx(want, rel=2e-3, abs=2e-4), (component, row, want)
        assert abs(want) > 1e-3, "not vacuous"


# --------------------------------------------------------------------------------------------
# Saturated attention: where the paper says AtP fails and the QK fix holds
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saturated(tiny_llama_path) -> dict:
    """The tiny llama with its last layer's queries scaled 40x: that layer's softmax saturates (each row puts
    almost all its weight on one key), so the gradient through it says little about a real patch."""
    from engine.model import load_model

    lm = load_model(str(tiny_llama_path), "tiny-llama-saturated")
    attn = lm.model.model.layers[-1].self_attn
    attn.q_proj.weight = attn.q_proj.weight * 40.0
    mx.eval(attn.q_proj.weight)
    clean, corrupted = lm.text_prompt(CLEAN), lm.text_prompt(CORRUPTED)
    a, b = lm.text_prompt("Mary")[0], lm.text_prompt("John")[0]
    return {"lm": lm, "model": Model(lm), "clean": clean, "corrupted": corrupted,
            "metric": {"type": "logit_diff", "token_ids": [a, b]}}


def test_saturated_attention_atp_star_is_closer_to_patching(saturated):
    s = saturated
    layer = s["lm"].info.n_layers - 1
    sites = [f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"]
    pattern = s["model"].generate(prompt=s["corrupted"], max_tokens=1, temperature=0,
                                  hooks=[{"layer_name": f"blocks.{layer}.attn.hook_pattern"}]).activations
    n = len(s["corrupted"])
    rows_max = pattern[f"blocks.{layer}.attn.hook_pattern"][:n, :, :n].max(axis=-1)
    assert np.median(rows_max[1:]) > 0.95, "the constructed layer's attention is saturated"
    k = 16
    plain = s["model"].attribute(clean={"prompt": s["clean"]}, corrupted={"prompt": s["corrupted"]},
                                 metric=s["metric"], sites=[{"layer_name": x} for x in sites], verify_top=k)
    fixed = star(s, sites, verify_top=k)
    # The same rows, both ways: verify atp's top k by |estimate| and atp*'s by its GradDrop score.
    patched = {**{(r["layer_name"], r["position"], r["head"]): r["patched"] for r in plain["verified"]},
               **{(r["layer_name"], r["position"], r["head"]): r["patched"] for r in fixed["verified"]}}
    atp, atp_star = by_key(plain["attributions"]), by_key(fixed["attributions"])
    err_atp = np.array([abs(atp[key]["estimate"] - p) for key, p in patched.items()])
    err_star = np.array([abs(atp_star[key]["estimate"] - p) for key, p in patched.items()])
    scale = max(abs(p) for p in patched.values())
    assert scale > 0.1, "not vacuous: some patches move the metric"
    assert err_star.sum() < 0.25 * err_atp.sum(), (err_star.sum(), err_atp.sum())
    # The row the patch moves most: AtP, linear through the saturated softmax, misses most of it (a false
    # negative in the paper's sense); the QK fix, exact up to the softmax, gets most of it.
    key = max(patched, key=lambda x: abs(patched[x]))
    p = patched[key]
    assert abs(atp[key]["estimate"] - p) > 0.5 * abs(p), (key, p, atp[key]["estimate"])
    assert abs(atp_star[key]["estimate"] - p) < 0.3 * abs(p), (key, p, atp_star[key]["estimate"])


# --------------------------------------------------------------------------------------------
# GradDrop against torch autograd with detach()
# --------------------------------------------------------------------------------------------
class DetachEdit:
    """Stops the gradient through one hook point of the reference (GradDrop's dropped layer)."""

    def __init__(self, site: str):
        self.site = site

    def apply(self, x):
        return x.detach()


GD_SITES = ["hook_embed", "blocks.{}.hook_resid_pre", "blocks.{}.hook_attn_out", "blocks.{}.hook_mlp_out",
            "blocks.{}.hook_resid_post", "blocks.{}.attn.hook_z", "blocks.{}.attn.hook_v", "blocks.{}.mlp.hook_post"]


def torch_graddrop(ref: Reference, s: dict, sites: list[str], n_layers: int) -> tuple[dict, dict]:
    """({(site, position, head): AtP estimate}, {...: GradDrop score}) from torch autograd."""
    import torch

    def estimates(drop: int | None) -> dict:
        out = {}

        def run(ids):
            edits = [DeltaEdit(x) for x in sites]
            points = () if drop is None else (f"blocks.{drop}.hook_attn_out", f"blocks.{drop}.hook_mlp_out")
            stops = [DetachEdit(x) for x in points]
            ref.edits = edits + stops  # deltas first, then the stop: as the engine orders them
            try:
                logits = ref.model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            finally:
                ref.edits = []
            a, b = s["metric"]["token_ids"]
            return logits[a] - logits[b], edits

        _, clean = run(s["clean"])
        value, corrupt = run(s["corrupted"])
        value.backward()
        for site, c, e in zip(sites, clean, corrupt):
            grad = e.delta.grad if e.delta.grad is not None else torch.zeros_like(e.delta)
            per = ((c.seen - e.seen) * grad).sum(-1)[0].numpy()
            for p in range(len(s["corrupted"])):
                if per.ndim == 2:
                    out.update({(site, p, h): float(per[h, p]) for h in range(per.shape[0])})
                else:
                    out[(site, p, None)] = float(per[p])
        return out

    plain = estimates(None)
    total = {key: 0.0 for key in plain}
    for layer in range(n_layers):
        for key, value in estimates(layer).items():
            total[key] += abs(value)
    return plain, {key: v / (n_layers - 1) for key, v in total.items()}


def test_graddrop_equals_torch_autograd(s, arch):
    n_layers = s["lm"].info.n_layers
    sites = []
    for template in GD_SITES:
        sites += [template.format(i) for i in range(n_layers)] if "{}" in template else [template]
    ref = Reference(s["path"], arch, f"attribution_star_{arch}")
    want_plain, want = torch_graddrop(ref, s, sites, n_layers)
    out = star(s, sites)
    got = by_key(out["attributions"])
    assert set(got) == set(want)
    keys = list(want)
    # Away from queries and keys, atp*'s estimate is atp's.
    assert_close(np.array([got[k]["estimate"] for k in keys]), np.array([want_plain[k] for k in keys]), 1e-4,
                 "estimates")
    got_v, want_v = np.array([got[k]["graddrop"] for k in keys]), np.array([want[k] for k in keys])
    assert (got_v >= 0).all()
    assert np.abs(want_v).max() > 0.1  # not vacuous
    assert_close(got_v, want_v, 1e-4, "graddrop")
    # GradDrop differs from |AtP| somewhere (it is not a relabelling), and equals it for the last layer's
    # attention and MLP outputs (nothing downstream to drop; their own layer's term is 0).
    plain_abs = np.array([abs(want_plain[k]) for k in keys])
    assert np.abs(got_v - plain_abs).max() > 1e-2
    last = [i for i, k in enumerate(keys) if k[0] in (f"blocks.{n_layers - 1}.hook_attn_out",
                                                      f"blocks.{n_layers - 1}.hook_mlp_out")]
    np.testing.assert_allclose(got_v[last], plain_abs[last], rtol=1e-4, atol=1e-6)


def test_atp_star_verifies_by_graddrop(s):
    sites = [f"blocks.{i}.{h}" for i in range(s["lm"].info.n_layers) for h in ("hook_attn_out", "hook_mlp_out")]
    out = star(s, sites + ["blocks.1.attn.hook_q"], verify_top=5)
    top = sorted(out["attributions"], key=lambda r: -r["graddrop"])[:5]
    assert [{k: v for k, v in r.items() if k != "patched"} for r in out["verified"]] == top
    assert out["method"] == "atp*" and out["verify_skipped"] == 0


# --------------------------------------------------------------------------------------------
# The deadline on verify_top's patches
# --------------------------------------------------------------------------------------------
def test_deadline_skips_verifying_patches(tiny_llama):
    kw = dict(clean={"prompt": CLEAN}, corrupted={"prompt": CORRUPTED}, metric={"type": "logit_diff",
                                                                                "token_ids": [5, 9]},
              sites=[{"layer_name": "blocks.1.hook_mlp_out"}, {"layer_name": "blocks.0.attn.hook_z"}], verify_top=4)
    plan = plan_attribution(tiny_llama, **kw)
    full = run_attribution(plan)
    assert full["verify_skipped"] == 0 and all(v["patched"] is not None for v in full["verified"])
    late = run_attribution(plan, deadline=time.monotonic() - 1)  # already past: nothing is patched
    assert late["verify_skipped"] == 4
    assert all(v["patched"] is None and v["skipped"] for v in late["verified"])
    assert [v["estimate"] for v in late["verified"]] == [v["estimate"] for v in full["verified"]]
    assert late["attributions"] == full["attributions"]  # the estimates are never cut short
    # A deadline far away changes nothing.
    assert run_attribution(plan, deadline=time.monotonic() + 600)["verified"] == full["verified"]


# --------------------------------------------------------------------------------------------
# HTTP: atp* and the Arrow answer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_http_arrow_answer(client, method):
    import json

    import pyarrow as pa

    body = _body(sites=[{"layer_name": "blocks.1.hook_attn_out"}, {"layer_name": "blocks.0.attn.hook_z"},
                        {"layer_name": "blocks.2.attn.hook_k"}], verify_top=3, method=method)
    plain = client.post("/v1/attribution", json=body)
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("application/json")
    want = plain.json()
    r = client.post("/v1/attribution", json=body, headers={"Accept": ARROW_STREAM})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(ARROW_STREAM)
    table = pa.ipc.open_stream(r.content).read_all()
    columns = ["layer_name", "component", "position", "head", "estimate"] + (["graddrop"] if method == "atp*" else [])
    assert table.column_names == columns
    assert table.schema.field("position").type == pa.int32() and table.schema.field("estimate").type == pa.float64()
    rows = want["attributions"]
    assert table.num_rows == len(rows)
    assert table.column("layer_name").to_pylist() == [x["layer_name"] for x in rows]
    assert table.column("component").to_pylist() == [x["component"] for x in rows]
    assert table.column("position").to_pylist() == [x["position"] for x in rows]
    assert table.column("head").to_pylist() == [x.get("head") for x in rows]  # null on whole-site rows
    assert table.column("estimate").to_pylist() == [x["estimate"] for x in rows]
    if method == "atp*":
        assert table.column("graddrop").to_pylist() == [x["graddrop"] for x in rows]
    meta = {k.decode(): json.loads(v) for k, v in table.schema.metadata.items()}
    assert meta["clean_metric"] == want["clean_metric"] and meta["corrupted_metric"] == want["corrupted_metric"]
    assert meta["verified"] == want["verified"] and meta["method"] == method and meta["model"] == "tiny-llama"
    assert "attributions" not in meta
    # An error stays JSON whatever was accepted.
    bad = client.post("/v1/attribution", json=_body(corrupted={"prompt": "Mary"}), headers={"Accept": ARROW_STREAM})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "corrupted"


def test_http_time_limit_skips_verifying_patches(tiny_llama, tmp_path):
    """max_seconds_per_request bounds verify_top's patches: with a limit already spent when the estimates are
    done, every verified row is skipped (`patched` null) and the estimates are complete."""
    import inspect

    from starlette.testclient import TestClient

    from control.app import AppConfig, create_app
    from control.service import ModelService, ServiceConfig
    from shm import ShmRegistry

    if "deadline" not in inspect.getsource(ModelService.run_attribution):
        pytest.skip("control/service.py does not pass its time limit to run_attribution yet")
    registry = ShmRegistry(state_dir=tmp_path / "state", cleanup_at_exit=False)
    service = ModelService(ServiceConfig(max_seconds_per_request=1e-6))
    service.model = Model(tiny_llama)
    app = create_app(AppConfig(state_dir=str(tmp_path / "state")), service, registry)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as c:
            r = c.post("/v1/attribution", json=_body(verify_top=3))
    finally:
        registry.close()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["verify_skipped"] == 3 and all(v["patched"] is None and v["skipped"] for v in body["verified"])
    assert len(body["attributions"]) == 3 * 3 * body["n_tokens"]


# --------------------------------------------------------------------------------------------
# The real default model (slow): docs/attribution.md's queries-and-keys example
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_qk_fix_is_closer_to_patching(default_model):
    """Every layer's queries and keys on the indirect-object pair: over the rows either method verifies, atp*'s
    estimates are much closer to the real patches (measured: total error 0.64 against 4.62 over 10 rows)."""
    model, lm = Model(default_model), default_model
    mary, john = lm.text_prompt(" Mary")[0], lm.text_prompt(" John")[0]
    request = dict(clean={"prompt": "When John and Mary went to the store, John gave a drink to"},
                   corrupted={"prompt": "When John and Mary went to the store, Mary gave a drink to"},
                   metric={"type": "logit_diff", "token_ids": [mary, john]},
                   sites=[{"layer_name": f"blocks.{i}.attn.hook_{x}"} for i in range(30) for x in "qk"], verify_top=8)
    plain, fixed = model.attribute(**request), model.attribute(**request, method="atp*")
    key = lambda r: (r["layer_name"], r["position"], r.get("head"))  # noqa: E731
    patched = {key(r): r["patched"] for r in plain["verified"] + fixed["verified"]}
    atp, atp_star = ({key(r): r["estimate"] for r in out["attributions"]} for out in (plain, fixed))
    err_atp = sum(abs(atp[k] - p) for k, p in patched.items())
    err_star = sum(abs(atp_star[k] - p) for k, p in patched.items())
    assert err_star < 0.3 * err_atp, (err_star, err_atp)
    assert max(abs(p) for p in patched.values()) > 1.0  # not vacuous
