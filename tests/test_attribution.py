"""Attribution patching (engine/attribution.py, POST /v1/attribution) on the tiny random models.

The estimate of each site and position is (a_clean - a_corrupted) . dM/da at the corrupted run.
Checked three independent ways: (1) it is the directional derivative of the metric along
(a_clean - a_corrupted), which a central finite difference of real `add` interventions through
the engine API measures; (2) Hugging Face transformers with torch autograd (hooks that add a
zero tensor with requires_grad at the same points, backward of the same metric) gives the same
number for every site, position and head; (3) the `verified` values equal what the interventions
API's `patch` op gives for the same site and position. Then the HTTP endpoint: bad requests are
400s that say why, a good one round-trips.
"""

from __future__ import annotations

from typing import Any

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import numpy as np
import pytest

from engine.api import Model
from engine.attribution import default_sites, plan_attribution, run_attribution
from engine.errors import InvalidArgument, UnknownHook
from engine.interventions import sources_from
from tests.reference import assert_close
from tests.test_interventions import SITES, Reference

CLEAN = "John gave Mary the book because she"
CORRUPTED = "Mary gave John the book because she"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["llama", "gpt2"])
def arch(request) -> str:
    return request.param


def _setup(request, arch: str) -> dict:
    lm = request.getfixturevalue(f"tiny_{arch}")
    clean, corrupted = lm.text_prompt(CLEAN), lm.text_prompt(CORRUPTED)
    assert len(clean) == len(corrupted) and clean != corrupted
    a, b = lm.text_prompt("Mary")[0], lm.text_prompt("John")[0]
    assert a != b
    return {"lm": lm, "model": Model(lm), "clean": clean, "corrupted": corrupted, "a": a, "b": b,
            "metric": {"type": "logit_diff", "token_ids": [a, b]}, "path": request.getfixturevalue(f"tiny_{arch}_path")}


@pytest.fixture
def s(request, arch) -> dict:
    return _setup(request, arch)


def every_site(lm) -> list[str]:
    """Every interventable hook point of every layer (test_interventions' SITES)."""
    names = []
    for template in SITES:
        layers = range(lm.info.n_layers) if "{}" in template else [None]
        names += [template.format(i) for i in layers]
    return names


def attribute(s: dict, sites=None, metric=None, verify_top=None) -> dict:
    return s["model"].attribute(clean={"prompt": s["clean"]}, corrupted={"prompt": s["corrupted"]},
                                metric=metric or s["metric"], sites=sites, verify_top=verify_top)


def metric_of(s: dict, interventions=None, sources=None, metric=None) -> float:
    """The metric on the corrupted prompt through the engine's ordinary generation (one step)."""
    metric = metric or s["metric"]
    ids = metric["token_ids"] if metric["type"] == "logit_diff" else [metric["token_id"]]
    out = s["model"].generate(prompt=s["corrupted"], max_tokens=1, temperature=0, hooks=None,
                              logprob_token_ids=ids, interventions=interventions, sources=sources)
    lp = dict(out.logprobs[0].targets)
    return lp[ids[0]] - lp[ids[1]] if metric["type"] == "logit_diff" else lp[ids[0]]


def by_key(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["layer_name"], r["position"], r.get("head")): r for r in rows}


# --------------------------------------------------------------------------------------------
# The answer's shape
# --------------------------------------------------------------------------------------------
def test_default_sites_and_order(s):
    lm = s["lm"]
    out = attribute(s)
    n, layers = len(s["clean"]), lm.info.n_layers
    names = [f"blocks.{i}.{h}" for i in range(layers) for h in ("hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    assert [d["layer_name"] for d in default_sites(lm)] == names
    rows = out["attributions"]
    assert [(r["layer_name"], r["position"]) for r in rows] == [(name, p) for name in names for p in range(n)]
    assert [r["component"] for r in rows[::n]] == ["attention", "mlp", "residual"] * layers
    assert all(set(r) == {"layer_name", "component", "position", "estimate"} for r in rows)
    assert "verified" not in out
    assert out["n_tokens"] == n and len(out["clean_tokens"]) == len(out["corrupted_tokens"]) == n
    # The metrics are the plain runs' (through ordinary generation)
    assert out["corrupted_metric"] == pytest.approx(metric_of(s), abs=1e-4)
    assert out["clean_metric"] != pytest.approx(out["corrupted_metric"], abs=1e-3)


def test_per_head_sites_give_one_estimate_per_head(s):
    lm = s["lm"]
    dims, n = lm.info.dims, len(s["clean"])
    sites = ["blocks.1.attn.hook_z", "blocks.0.attn.hook_k", "blocks.2.hook_resid_pre"]
    rows = attribute(s, sites=[{"layer_name": x} for x in sites])["attributions"]
    want = [("blocks.1.attn.hook_z", p, h) for p in range(n) for h in range(dims["n_heads"])]
    want += [("blocks.0.attn.hook_k", p, h) for p in range(n) for h in range(dims["n_kv_heads"])]
    want += [("blocks.2.hook_resid_pre", p, None) for p in range(n)]
    assert [(r["layer_name"], r["position"], r.get("head")) for r in rows] == want
    # The per-head estimates add up to the whole site's: hook_z's heads are the o_proj input.
    z = sum(r["estimate"] for r in rows if r["layer_name"] == "blocks.1.attn.hook_z")
    whole = sum(r["estimate"] for r in attribute(s, sites=[{"layer_name": "blocks.1.attn.hook_z"}])["attributions"])
    assert z == pytest.approx(whole, rel=1e-6)


# --------------------------------------------------------------------------------------------
# (1) The estimate is the derivative along (clean - corrupted): central finite differences
# --------------------------------------------------------------------------------------------
FD_SITES = ["hook_embed", "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post",
            "blocks.1.attn.hook_z", "blocks.0.attn.hook_v", "blocks.2.attn.hook_q", "blocks.1.mlp.hook_post"]


@pytest.mark.parametrize("metric_type", ["logit_diff", "logprob"])
def test_estimate_is_a_central_finite_difference(s, metric_type):
    metric = s["metric"] if metric_type == "logit_diff" else {"type": "logprob", "token_id": s["a"]}
    model = s["model"]
    hooks = [{"layer_name": x} for x in FD_SITES]
    clean = model.generate(prompt=s["clean"], max_tokens=1, temperature=0, hooks=hooks).activations
    corrupt = model.generate(prompt=s["corrupted"], max_tokens=1, temperature=0, hooks=hooks).activations
    rows = attribute(s, sites=hooks, metric=metric)["attributions"]
    eps = 1e-2
    checked = 0
    for site in FD_SITES:
        mine = [r for r in rows if r["layer_name"] == site]
        top = max(mine, key=lambda r: abs(r["estimate"]))
        last = next(r for r in mine if r["position"] == len(s["clean"]) - 1 and r.get("head", 0) == top.get("head", 0))
        for row in {id(top): top, id(last): last}.values():
            p, h = row["position"], row.get("head")
            direction = clean[site][p] - corrupt[site][p]  # [n] or [heads, d]
            if h is not None:
                only = np.zeros_like(direction)
                only[h] = direction[h]
                direction = only
            if not np.abs(direction).max():
                assert row["estimate"] == 0.0
                continue

            def moved(sign: float) -> float:
                add = {"layer_name": site, "op": "add", "vector": (sign * eps * direction).tolist(), "positions": [p]}
                return metric_of(s, [add], metric=metric)

            # Central differences at eps and 2 eps, combined (Richardson): the truncation error is O(eps^4);
            # what is left (~1e-4 at most here) is float32 rounding of the metric, divided by eps.
            fd = (8 * (moved(1.0) - moved(-1.0)) - (moved(2.0) - moved(-2.0))) / (12 * eps)
            assert row["estimate"] == pytest.approx(fd, rel=5e-4, abs=2e-4), (site, p, h, row["estimate"], fd)
            checked += 1
    assert checked >= len(FD_SITES)


def finite_difference(model: Model, ids: list[int], metric: dict, site: str, position: int, direction: np.ndarray,
                      eps: float = 1e-2) -> float:
    """d metric / d eps of an `add` of eps * direction at one site and position (Richardson-extrapolated
    central differences) through the engine's ordinary generation."""
    def moved(step: float) -> float:
        add = {"layer_name": site, "op": "add", "vector": (step * eps * direction).tolist(), "positions": [position]}
        out = model.generate(prompt=ids, max_tokens=1, temperature=0, hooks=None, interventions=[add],
                             logprob_token_ids=metric["token_ids"])
        lp = dict(out.logprobs[0].targets)
        return lp[metric["token_ids"][0]] - lp[metric["token_ids"][1]]

    return (8 * (moved(1.0) - moved(-1.0)) - (moved(2.0) - moved(-2.0))) / (12 * eps)


ZOO_SITES = ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]


@pytest.mark.parametrize("name", sorted(__import__("tests.test_arch_zoo", fromlist=["QUICK"]).QUICK))
def test_estimate_is_a_finite_difference_on_every_family(name):
    """Dense, GPT-style, sliding-window, mixture-of-experts (the router's top-k is not differentiable,
    but is constant nearby), attention sinks, multi-head latent attention: the gradient flows through each."""
    from engine.model import load_model
    from tests.test_arch_zoo import zoo_model

    lm = load_model(str(zoo_model(name)), name)
    model = Model(lm)
    clean = lm.text_prompt("John gave Mary the book because she asked")
    corrupted = [clean[2], clean[1], clean[0], *clean[3:]]
    assert corrupted != clean
    metric = {"type": "logit_diff", "token_ids": [5, 9]}
    hooks = [{"layer_name": x} for x in ZOO_SITES]
    acts = [model.generate(prompt=ids, max_tokens=1, temperature=0, hooks=hooks).activations
            for ids in (clean, corrupted)]
    rows = model.attribute(clean={"prompt": clean}, corrupted={"prompt": corrupted}, metric=metric,
                           sites=hooks)["attributions"]
    for site in ZOO_SITES:
        row = max((r for r in rows if r["layer_name"] == site), key=lambda r: abs(r["estimate"]))
        p = row["position"]
        fd = finite_difference(model, corrupted, metric, site, p, acts[0][site][p] - acts[1][site][p])
        assert row["estimate"] == pytest.approx(fd, rel=1e-3, abs=2e-4), (site, p, row["estimate"], fd)
        assert abs(fd) > 1e-3, "not vacuous"


# --------------------------------------------------------------------------------------------
# (2) The same gradients from Hugging Face transformers with torch autograd
# --------------------------------------------------------------------------------------------
class DeltaEdit:
    """Adds a zero tensor with requires_grad at one hook point of the reference; keeps the point's value."""

    def __init__(self, site: str):
        self.site, self.delta, self.seen = site, None, None

    def apply(self, x):
        import torch

        if self.delta is None:
            self.delta = torch.zeros_like(x, requires_grad=True)
        self.seen = x.detach().clone()
        return x + self.delta


def torch_estimates(ref: Reference, clean: list[int], corrupted: list[int], metric: dict, sites: list[str]):
    """(clean metric, corrupted metric, {(site, position, head): estimate}) from torch autograd."""
    import torch

    def run(ids):
        edits = [DeltaEdit(x) for x in sites]
        ref.edits = edits
        try:
            logits = ref.model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        finally:
            ref.edits = []
        if metric["type"] == "logit_diff":
            a, b = metric["token_ids"]
            value = logits[a] - logits[b]
        else:
            value = torch.log_softmax(logits, -1)[metric["token_id"]]
        return value, edits

    clean_value, clean_edits = run(clean)
    corrupt_value, edits = run(corrupted)
    corrupt_value.backward()
    out = {}
    for site, c, e in zip(sites, clean_edits, edits):
        per = ((c.seen - e.seen) * e.delta.grad).sum(-1)[0].numpy()  # [T] or [H, T]
        for p in range(len(corrupted)):
            if per.ndim == 2:
                out.update({(site, p, h): float(per[h, p]) for h in range(per.shape[0])})
            else:
                out[(site, p, None)] = float(per[p])
    return float(clean_value.detach()), float(corrupt_value.detach()), out


@pytest.mark.parametrize("metric_type", ["logit_diff", "logprob"])
def test_estimates_equal_torch_autograd(s, arch, metric_type):
    metric = s["metric"] if metric_type == "logit_diff" else {"type": "logprob", "token_id": s["a"]}
    sites = every_site(s["lm"])
    ref = Reference(s["path"], arch, f"attribution_{arch}")
    want_clean, want_corrupt, want = torch_estimates(ref, s["clean"], s["corrupted"], metric, sites)
    out = attribute(s, sites=[{"layer_name": x} for x in sites], metric=metric)
    assert out["clean_metric"] == pytest.approx(want_clean, rel=1e-4, abs=1e-4)
    assert out["corrupted_metric"] == pytest.approx(want_corrupt, rel=1e-4, abs=1e-4)
    got = by_key(out["attributions"])
    assert set(got) == set(want)
    keys = list(want)
    got_v, want_v = np.array([got[k]["estimate"] for k in keys]), np.array([want[k] for k in keys])
    assert np.abs(want_v).max() > 0.1  # not vacuous
    assert_close(got_v, want_v, 1e-4, "estimates")
    for site in sites:  # and per site, relative to that site's own magnitude
        idx = [i for i, k in enumerate(keys) if k[0] == site]
        scale = max(np.abs(want_v[idx]).max(), 1e-3)
        err = np.abs(got_v[idx] - want_v[idx]).max() / scale
        assert err < 1e-3, (site, err)


# --------------------------------------------------------------------------------------------
# (3) verify_top is the interventions API's patch
# --------------------------------------------------------------------------------------------
def test_verified_equals_the_patch_intervention(s):
    sites = ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z",
             "blocks.0.attn.hook_k", "hook_embed", "blocks.2.hook_resid_pre", "blocks.1.mlp.hook_post"]
    k = 12
    out = attribute(s, sites=[{"layer_name": x} for x in sites], verify_top=k)
    rows, verified = out["attributions"], out["verified"]
    top = sorted(rows, key=lambda r: -abs(r["estimate"]))[:k]
    assert [{x: v for x, v in r.items() if x != "patched"} for r in verified] == top
    clean = s["model"].generate(prompt=s["clean"], max_tokens=1, temperature=0,
                                hooks=[{"layer_name": x} for x in sites]).capture
    base = metric_of(s)
    assert out["corrupted_metric"] == pytest.approx(base, abs=1e-5)
    for r in verified:
        patch = {"layer_name": r["layer_name"], "op": "patch", "positions": [r["position"]],
                 "source": {"capture_id": clean.capture_id, "hook_id": r["layer_name"]}}
        if "head" in r:
            patch["heads"] = [r["head"]]
        want = metric_of(s, [patch], sources_from(clean)) - base
        assert r["patched"] == pytest.approx(want, rel=1e-4, abs=1e-5), r
    # Not vacuous: some patches move the metric a lot, and every kind of site was verified.
    assert max(abs(r["patched"]) for r in verified) > 0.1
    assert len({r["layer_name"] for r in verified}) >= 3


def test_patching_with_component_names(s):
    """Sites named by layer_name + component verify through the same patch (the component is kept)."""
    sites = [{"layer_name": "model.layers.1", "component": "mlp"}, {"layer_name": "model.layers.0",
                                                                     "component": "head_output"}]
    out = attribute(s, sites=sites, verify_top=3)
    assert {r["component"] for r in out["attributions"]} == {"mlp", "head_output"}
    assert len(out["verified"]) == 3
    named = attribute(s, sites=[{"layer_name": "blocks.1.hook_mlp_out"}, {"layer_name": "blocks.0.attn.hook_z"}],
                      verify_top=3)
    assert [r["estimate"] for r in out["attributions"]] == [r["estimate"] for r in named["attributions"]]
    assert [r["patched"] for r in out["verified"]] == [r["patched"] for r in named["verified"]]


# --------------------------------------------------------------------------------------------
# Bad requests (engine)
# --------------------------------------------------------------------------------------------
BAD = [  # (id, change to the request, error class, arg, needles)
    ("lengths", {"corrupted": {"prompt": "Mary gave John"}}, InvalidArgument, "corrupted", ["19", "same length"]),
    ("token-id", {"metric": {"type": "logit_diff", "token_ids": [5, 10 ** 6]}}, InvalidArgument,
     "metric.token_ids[1]", ["1000000", "vocabulary"]),
    ("logprob-token-id", {"metric": {"type": "logprob", "token_id": -1}}, InvalidArgument, "metric.token_id",
     ["-1"]),
    ("metric-type", {"metric": {"type": "kl"}}, InvalidArgument, "metric.type", ["logit_diff", "logprob"]),
    ("metric-two-ids", {"metric": {"type": "logit_diff", "token_ids": [5]}}, InvalidArgument, "metric.token_ids",
     []),
    ("unknown-site", {"sites": [{"layer_name": "blocks.0.hook_attn_out"}, {"layer_name": "blocks.0.hook_resid_postt"}]},
     UnknownHook, "sites[1].layer_name", ["hook_resid_postt"]),
    ("unknown-layer", {"sites": [{"layer_name": "blocks.0.hook_attn_out"}, {"layer_name": "blocks.1.hook_mlp_out"},
                                 {"layer_name": "blocks.7.hook_mlp_out"}]}, UnknownHook, "sites[2].layer_name",
     ["3 layers"]),
    ("pattern", {"sites": [{"layer_name": "blocks.0.attn.hook_pattern"}]}, InvalidArgument, "sites[0].layer_name",
     ["cannot be intervened on"]),
    ("capture-input", {"sites": [{"layer_name": "model.layers.0", "component": "mlp", "capture_input": True}]},
     InvalidArgument, "sites[0].capture_input", ["hook_resid_pre"]),
    ("capture-nothing", {"sites": [{"layer_name": "model.layers.0", "component": "mlp", "capture_output": False}]},
     InvalidArgument, "sites[0].capture_output", []),
    ("missing-component", {"sites": [{"layer_name": "model.layers.0"}]}, InvalidArgument, "sites[0].component",
     ["component"]),
    ("too-long", {"clean": {"prompt": list(range(300))}, "corrupted": {"prompt": list(range(300))}},
     InvalidArgument, "clean.prompt", ["context length"]),
    ("clean-token-id", {"clean": {"prompt": [1, 2, 100000]}}, InvalidArgument, "clean.prompt[2]", ["100000"]),
    ("no-sites", {"sites": []}, InvalidArgument, "sites", ["empty"]),
    ("clean-both", {"clean": {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}}, InvalidArgument,
     "clean.prompt", ["not both"]),
    ("clean-empty", {"clean": {"prompt": ""}}, InvalidArgument, "clean.prompt", ["empty"]),
    ("clean-not-object", {"clean": "John"}, InvalidArgument, "clean", ["messages", "prompt"]),
    ("clean-bad-message", {"clean": {"messages": [{"role": "robot", "content": "x"}]}}, InvalidArgument,
     "clean.messages[0].role", ["role"]),
    ("method", {"method": "ig"}, InvalidArgument, "method", ["atp"]),
    ("verify-top", {"verify_top": -1}, InvalidArgument, "verify_top", ["non-negative"]),
]


@pytest.mark.parametrize("change,exc,arg,needles", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_are_refused(tiny_llama, change, exc, arg, needles):
    request: dict[str, Any] = {"clean": {"prompt": CLEAN}, "corrupted": {"prompt": CORRUPTED},
                               "metric": {"type": "logit_diff", "token_ids": [5, 9]}, **change}
    with pytest.raises(exc) as info:
        plan_attribution(tiny_llama, **request)
    assert info.value.arg == arg, info.value.message
    for needle in needles:
        assert needle in info.value.message, info.value.message


def test_model_unchanged_after_attribution(tiny_llama):
    from tests.reference import assert_unchanged, snapshot

    before = snapshot(tiny_llama)
    plan = plan_attribution(tiny_llama, clean={"prompt": CLEAN}, corrupted={"prompt": CORRUPTED},
                            metric={"type": "logprob", "token_id": 5},
                            sites=[{"layer_name": x} for x in every_site(tiny_llama)], verify_top=2)
    run_attribution(plan)
    assert_unchanged(tiny_llama, before)


# --------------------------------------------------------------------------------------------
# (4) HTTP
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tiny_llama, tmp_path_factory):
    from starlette.testclient import TestClient

    from control.app import AppConfig, create_app
    from control.service import ModelService, ServiceConfig
    from shm import ShmRegistry

    state = tmp_path_factory.mktemp("attribution-http")
    registry = ShmRegistry(state_dir=state, cleanup_at_exit=False)
    service = ModelService(ServiceConfig())
    service.model = Model(tiny_llama)
    app = create_app(AppConfig(state_dir=str(state)), service, registry)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c
    registry.close()


def _body(**change) -> dict:
    return {"clean": {"prompt": CLEAN}, "corrupted": {"prompt": CORRUPTED},
            "metric": {"type": "logit_diff", "token_ids": [5, 9]}, **change}


HTTP_BAD = [  # (id, change, param, code, needles)
    ("lengths", {"corrupted": {"prompt": "Mary gave John"}}, "corrupted", "invalid_value", ["19 tokens", "tokens"]),
    ("token-id", {"metric": {"type": "logit_diff", "token_ids": [5, 100000]}}, "metric.token_ids[1]",
     "invalid_value", ["100000"]),
    ("unknown-site", {"sites": [{"layer_name": "blocks.0.hook_attn_out"}, {"layer_name": "blocks.9.hook_mlp_out"}]},
     "sites[1].layer_name", "unknown_hook", ["3 layers"]),
    ("method", {"method": "ig"}, "method", None, []),
    ("metric-type", {"metric": {"type": "kl", "token_id": 3}}, "metric", None, []),
    ("unknown-field", {"verify": 3}, "verify", None, []),
    ("messages", {"clean": {"messages": [{"role": "user", "content": CLEAN}]}}, "corrupted", "invalid_value",
     ["tokens"]),
]


@pytest.mark.parametrize("change,param,code,needles", [b[1:] for b in HTTP_BAD], ids=[b[0] for b in HTTP_BAD])
def test_http_bad_requests(client, change, param, code, needles):
    from tests.test_server import assert_error

    r = client.post("/v1/attribution", json=_body(**change))
    err = assert_error(r, 400, code)
    assert err["param"] is not None and err["param"].startswith(param), err
    for needle in needles:
        assert needle in err["message"], err


def test_http_round_trip(client, tiny_llama):
    request = _body(sites=[{"layer_name": "blocks.1.hook_attn_out"}, {"layer_name": "blocks.0.attn.hook_z"}],
                    verify_top=3)
    r = client.post("/v1/attribution", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "attribution" and body["model"] == "tiny-llama" and body["method"] == "atp"
    want = Model(tiny_llama).attribute(clean=request["clean"], corrupted=request["corrupted"],
                                       metric=request["metric"], sites=request["sites"], verify_top=3)
    assert body["attributions"] == want["attributions"]
    assert body["verified"] == want["verified"]
    assert body["clean_metric"] == want["clean_metric"] and body["corrupted_metric"] == want["corrupted_metric"]
    assert len(body["verified"]) == 3 and all("patched" in v for v in body["verified"])
    # The OpenAPI document lists the endpoint with its body.
    spec = client.get("/openapi.json").json()
    assert "requestBody" in spec["paths"]["/v1/attribution"]["post"]
    # Messages work too (with the chat template).
    chat = client.post("/v1/attribution", json=_body(clean={"messages": [{"role": "user", "content": CLEAN}]},
                                                     corrupted={"messages": [{"role": "user", "content": CORRUPTED}]}))
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["attributions"]) == 3 * 3 * chat.json()["n_tokens"]


# --------------------------------------------------------------------------------------------
# The real default model (slow): the worked example of docs/attribution.md
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_indirect_object_identification(default_model):
    model = Model(default_model)
    lm = default_model
    mary, john = lm.text_prompt(" Mary")[0], lm.text_prompt(" John")[0]
    clean = {"prompt": "When John and Mary went to the store, John gave a drink to"}
    corrupted = {"prompt": "When John and Mary went to the store, Mary gave a drink to"}
    metric = {"type": "logit_diff", "token_ids": [mary, john]}
    out = model.attribute(clean=clean, corrupted=corrupted, metric=metric, verify_top=8)
    assert out["clean_metric"] > 2 and out["corrupted_metric"] < -2
    last = out["n_tokens"] - 1
    final = f"blocks.{lm.info.n_layers - 1}.hook_resid_post"
    # Patching the whole last residual stream at the last position makes the run the clean one there.
    whole = model.attribute(clean=clean, corrupted=corrupted, metric=metric, sites=[{"layer_name": final}],
                            verify_top=1)["verified"][0]
    assert whole["position"] == last
    assert whole["patched"] == pytest.approx(out["clean_metric"] - out["corrupted_metric"], abs=1e-3)
    # The largest estimates are confirmed by real patching: same sign, and within a factor of two.
    for row in out["verified"]:
        assert row["estimate"] * row["patched"] > 0, row
        assert 0.5 < row["patched"] / row["estimate"] < 2, row
