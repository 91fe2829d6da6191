"""Indirect-object identification (IOI) on the HTTP API: logit differences, activation
patching, head ablation and steering, with plain `requests` so every body is on the wire.

    clean:     "When Mary and John went to the store, John gave a drink to"  -> " Mary"
    corrupted: "When Mary and John went to the store, Mary gave a drink to"  -> " John"

(a) the logit difference logit(" Mary") - logit(" John") of each prompt; (b) the residual
stream (blocks.N.hook_resid_pre) of the clean run patched into the corrupted run, layer by
layer, over all prompt positions, at the second name only (S2) and at the last position
(END); (c) every head's output (blocks.N.attn.hook_z, heads [h]) patched the same way, over all
prompt positions; (d) the top heads of (c) zero-ablated on the clean prompt, against as many
heads of least effect; (e) steering: two vectors made on the server from captures (the mean
residual of a positive and of a negative text), added with opposite signs, against the
baseline. docs/interventions.md explains each request and shows this script's output.

    python examples/ioi_patching.py                      # starts a server on the default model
    python examples/ioi_patching.py --url http://127.0.0.1:8080 --json ioi.json

About 420 one-token requests: 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack

import numpy as np
import requests
from _common import ROOT  # noqa: F401  (puts the checkout on sys.path)

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
TARGET, FOIL = " Mary", " John"  # the clean answer (indirect object) and the corrupted one
STEER_PROMPT = "I watched the new movie yesterday. I think it was"
STEER_POSITIVE = "I love this! It is wonderful, amazing, fantastic and great. I am so happy."
STEER_NEGATIVE = "I hate this! It is terrible, awful, horrible and bad. I am so sad."


class Api:
    """POST/GET/DELETE JSON; a non-2xx answer raises with the server's error object."""

    def __init__(self, base_url: str, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.requests = 0

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        self.requests += 1
        r = self.session.request(method, self.base_url + path, json=body, timeout=300)
        if not r.ok:
            raise SystemExit(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        return r.json()

    def complete(self, body: dict) -> dict:
        return self.call("POST", "/v1/chat/completions", body)

    def with_activations(self, body: dict) -> dict:
        return self.call("POST", "/v1/chat/completions/with_activations", body)


def one_token(prompt: str, ids: list[int], interventions: list[dict] | None = None) -> dict:
    """The body of a greedy one-token request on a raw prompt (no chat template) reporting the
    log-probabilities of `ids` at the first generated token."""
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprob_token_ids": ids}
    if interventions:
        body["interventions"] = interventions
    return body


def logit_diff(response: dict, target: int, foil: int) -> float:
    """logprob(target) - logprob(foil) at the first generated token: log-softmax shifts every
    logit by the same constant, so this is the logit difference."""
    entry = response["choices"][0]["logprobs"]["content"][0]
    lp = {t["token_id"]: t["logprob"] for t in entry["target_logprobs"]}
    return lp[target] - lp[foil]


def prompt_tokens(api: Api, prompt: str) -> tuple[list[str], list[int]]:
    """The server's tokenization of a raw prompt (the text and id of each position): a
    one-token request capturing one tiny tensor at the last position returns `tokens` and
    `token_ids` (prompt, then the generated token)."""
    r = api.with_activations({"prompt": prompt, "max_tokens": 1, "temperature": 0,
                              "activation_hooks": [{"layer_name": "hook_embed"}], "activation_positions": "last"})
    n = r["usage"]["prompt_tokens"]
    return r["tokens"][:n], r["token_ids"][:n]


def normalized(x, clean: float, corrupted: float):
    """(patched - corrupted) / (clean - corrupted): 1 = the clean behaviour restored, 0 = no effect."""
    return (np.asarray(x, dtype=np.float64) - corrupted) / (clean - corrupted)


def run(api: Api, args: argparse.Namespace) -> dict:
    out: dict = {}
    card = api.call("GET", "/v1/models")["data"][0]
    n_layers, n_heads = card["n_layers"], card["n_heads"]
    print(f"model {card['id']}: {n_layers} layers, {n_heads} heads, d_model {card['d_model']}")
    out["model"] = {k: card[k] for k in ("id", "n_layers", "n_heads", "d_model")}

    # --- the prompts, their tokens and the two answer ids ----------------------------------------
    clean_tokens, clean_ids = prompt_tokens(api, CLEAN)
    corr_tokens, corr_ids = prompt_tokens(api, CORRUPTED)
    if len(clean_ids) != len(corr_ids):
        raise SystemExit(f"the prompts have {len(clean_ids)} and {len(corr_ids)} tokens; patching needs equal counts")
    n = len(clean_ids)
    ids = {}
    for name in (TARGET, FOIL):  # a name that is one token appears as a whole token of the prompt
        if name not in clean_tokens:
            raise SystemExit(f"{name!r} is not one token of this model's vocabulary: {clean_tokens}")
        ids[name] = clean_ids[clean_tokens.index(name)]
    target, foil = ids[TARGET], ids[FOIL]
    differ = [i for i in range(n) if clean_ids[i] != corr_ids[i]]
    s2, end = differ[0], n - 1
    print(f"{n} tokens per prompt; token ids: {TARGET!r} = {target}, {FOIL!r} = {foil}")
    print(f"the prompts differ at position {differ} (S2: {clean_tokens[s2]!r} vs {corr_tokens[s2]!r}); "
          f"END = position {end} ({clean_tokens[end]!r})")
    out.update(tokens=clean_tokens, corrupted_tokens=corr_tokens, token_ids={TARGET: target, FOIL: foil},
               positions={"S2": s2, "END": end})
    lp_ids = [target, foil]

    # --- (a) logit differences ------------------------------------------------------------------
    r_clean = api.complete(one_token(CLEAN, lp_ids))
    r_corr = api.complete(one_token(CORRUPTED, lp_ids))
    clean_ld, corr_ld = logit_diff(r_clean, target, foil), logit_diff(r_corr, target, foil)
    print("\n(a) logit difference logit(' Mary') - logit(' John') at the first generated token")
    print("  prompt      reply     logP(' Mary')  logP(' John')  difference")
    for label, r in (("clean", r_clean), ("corrupted", r_corr)):
        e = r["choices"][0]["logprobs"]["content"][0]
        lp = {t["token_id"]: t["logprob"] for t in e["target_logprobs"]}
        print(f"  {label:10s}  {e['token']!r:8s}  {lp[target]:13.3f}  {lp[foil]:13.3f}  {lp[target] - lp[foil]:10.3f}")
    out["logit_diff"] = {"clean": clean_ld, "corrupted": corr_ld}

    # --- the clean capture: every layer's resid_pre and hook_z, kept on the server ---------------
    resid = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    z = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    cap = api.with_activations({**one_token(CLEAN, lp_ids), "activations_transport": "shm",
                                "activation_hooks": [{"layer_name": h} for h in resid + z]})
    capture_id = cap["capture"]["capture_id"]
    with ExitStack() as cleanup:
        cleanup.callback(lambda: api.call("DELETE", f"/v1/activations/{capture_id}"))
        cap_ld = logit_diff(cap, target, foil)
        print(f"\nclean capture {capture_id}: {len(resid + z)} hooks, {cap['capture']['handle']['byte_size']} bytes "
              f"in shared memory; its logit difference {cap_ld:.6f} (unchanged by capturing: {cap_ld == clean_ld})")
        out["capture_logit_diff_equal"] = cap_ld == clean_ld

        def patch(site: str, positions, heads: list[int] | None = None) -> float:
            spec = {"layer_name": site, "op": "patch", "source": {"capture_id": capture_id, "hook_id": site},
                    "positions": positions}
            if heads is not None:
                spec["heads"] = heads
            return logit_diff(api.complete(one_token(CORRUPTED, lp_ids, [spec])), target, foil)

        # --- (b) residual stream, layer by layer ------------------------------------------------
        t0 = time.time()
        sweeps = {"prompt": "prompt", "S2": [s2], "END": [end]}
        resid_ld = {k: [patch(site, pos) for site in resid] for k, pos in sweeps.items()}
        resid_norm = {k: normalized(v, clean_ld, corr_ld) for k, v in resid_ld.items()}
        print(f"\n(b) blocks.N.hook_resid_pre patched clean -> corrupted ({3 * n_layers} requests, "
              f"{time.time() - t0:.0f} s); normalized effect (patched - corrupted) / (clean - corrupted)")
        print(f"  layer  all prompt positions  S2 (pos {s2})  END (pos {end})")
        for i in range(n_layers):
            print(f"  {i:5d}  {resid_norm['prompt'][i]:20.3f}  {resid_norm['S2'][i]:11.3f}  {resid_norm['END'][i]:12.3f}")
        out["resid_pre"] = {k: {"logit_diff": resid_ld[k], "normalized": resid_norm[k].tolist()} for k in sweeps}

        # --- (c) every head's output ------------------------------------------------------------
        t0 = time.time()
        head_ld = np.array([[patch(z[i], "prompt", [h]) for h in range(n_heads)] for i in range(n_layers)])
        head_norm = normalized(head_ld, clean_ld, corr_ld)
        print(f"\n(c) blocks.N.attn.hook_z, one head at a time, patched at all prompt positions "
              f"({n_layers * n_heads} requests, {time.time() - t0:.0f} s); normalized effect")
        print("  layer " + "".join(f"{'h' + str(h):>7s}" for h in range(n_heads)))
        for i in range(n_layers):
            print(f"  {i:5d} " + "".join(f"{v:7.3f}" for v in head_norm[i]))
        order = np.argsort(-head_norm, axis=None)
        top = [(int(k // n_heads), int(k % n_heads)) for k in order[:args.top]]
        print(f"  top {args.top} heads: " + ", ".join(f"L{l}H{h} {head_norm[l, h]:+.3f}" for l, h in top))
        out["heads"] = {"logit_diff": head_ld.tolist(), "normalized": head_norm.tolist(),
                        "top": [{"layer": l, "head": h, "normalized": float(head_norm[l, h])} for l, h in top]}

    # --- (d) zero-ablate the top heads on the clean prompt -------------------------------------
    def ablate(heads: list[tuple[int, int]]) -> float:
        by_layer: dict[int, list[int]] = {}
        for layer, h in heads:
            by_layer.setdefault(layer, []).append(h)
        specs = [{"layer_name": f"blocks.{layer}.attn.hook_z", "op": "zero", "heads": hs}
                 for layer, hs in sorted(by_layer.items())]
        return logit_diff(api.complete(one_token(CLEAN, lp_ids, specs)), target, foil)

    least = [(int(k // n_heads), int(k % n_heads)) for k in np.argsort(np.abs(head_norm), axis=None)]
    print(f"\n(d) zero-ablating heads (blocks.N.attn.hook_z, op zero) on the clean prompt "
          f"(logit difference {clean_ld:.3f})")
    sizes = sorted({1, 3, args.top})
    width = max(len(", ".join(f"L{l}H{h}" for l, h in top[:k])) for k in sizes) + 8
    print(f"  {'zeroed':{width}s}  logit diff   change  | as many heads of least effect: logit diff   change")
    ablation = []
    for k in sizes:
        a, b = ablate(top[:k]), ablate(least[:k])
        label = f"top {k}: " + ", ".join(f"L{l}H{h}" for l, h in top[:k])
        print(f"  {label:{width}s}  {a:10.3f}  {a - clean_ld:+7.3f}  | {b:41.3f}  {b - clean_ld:+7.3f}")
        ablation.append({"heads": [list(x) for x in top[:k]], "logit_diff": a,
                         "control_heads": [list(x) for x in least[:k]], "control_logit_diff": b})
    out["ablation"] = ablation

    # --- (e) steering with vectors made from captures ------------------------------------------
    layer, c = args.steer_layer, args.steer_coefficient
    site = f"blocks.{layer}.hook_resid_post"
    vectors = []
    with ExitStack() as cleanup:
        for label, text in (("positive", STEER_POSITIVE), ("negative", STEER_NEGATIVE)):
            r = api.with_activations({"prompt": text, "max_tokens": 1, "temperature": 0,
                                      "activations_transport": "shm", "activation_hooks": [{"layer_name": site}]})
            cid, m = r["capture"]["capture_id"], r["usage"]["prompt_tokens"]
            # Position 0 is left out: the first token's residual is ~10x larger than the others (an attention sink).
            v = api.call("POST", "/v1/vectors", {"name": label, "layer": layer, "from_capture": {
                "capture_id": cid, "hook_id": site, "reduce": "mean", "positions": list(range(1, m))}})
            api.call("DELETE", f"/v1/activations/{cid}")  # the vector is a copy: the capture can go
            cleanup.callback(api.call, "POST", f"/v1/vectors/{v['vector_id']}/delete")
            vectors.append(v)
        pos, neg = vectors
        print(f"\n(e) steering at {site}: + {c} x mean residual of {STEER_POSITIVE!r}")
        print(f"    - {c} x mean residual of {STEER_NEGATIVE!r}")
        values = [np.array(api.call("GET", f"/v1/vectors/{v['vector_id']}")["vector"]) for v in vectors]
        diff_norm = float(np.linalg.norm(values[0] - values[1]))
        print(f"    vectors {pos['vector_id']} (norm {pos['norm']:.1f}), {neg['vector_id']} (norm {neg['norm']:.1f}); "
              f"their difference has norm {diff_norm:.1f}")
        r = api.complete({"prompt": STEER_PROMPT, "max_tokens": args.steer_tokens, "temperature": 0, "baseline": True,
                          "interventions": [
                              {"layer_name": site, "op": "add", "vector_id": pos["vector_id"], "coefficient": c},
                              {"layer_name": site, "op": "add", "vector_id": neg["vector_id"], "coefficient": -c}]})
        steered, base = r["choices"][0]["message"]["content"], r["baseline"]["choices"][0]["message"]["content"]
        print(f"  prompt:   {STEER_PROMPT!r}")
        print(f"  baseline: {base!r}")
        print(f"  steered:  {steered!r}")
        print(f"  positions touched per step: {r['interventions'][0]['positions_touched']}")
        out["steering"] = {"site": site, "coefficient": c, "prompt": STEER_PROMPT, "baseline": base, "steered": steered,
                           "vector_norms": [pos["norm"], neg["norm"]], "difference_norm": diff_norm,
                           "positions_touched": r["interventions"][0]["positions_touched"]}
    left = api.call("GET", "/v1/activations")
    out["requests"] = api.requests
    print(f"\n{api.requests} requests; live captures left: {len(left['segments'])}; "
          f"stored vectors left: {len(api.call('GET', '/v1/vectors')['data'])}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", "--base-url", dest="url", default=None,
                   help="a running server (default: start one on the default model, or --model)")
    p.add_argument("--api-key", default=None, help="if the server was started with --api-key")
    p.add_argument("--model", default=None, help="the model of the server this script starts (default: SmolLM2-135M)")
    p.add_argument("--json", default=None, help="write every number measured here")
    p.add_argument("--top", type=int, default=5, help="how many top heads to report and ablate")
    p.add_argument("--steer-layer", type=int, default=6)
    p.add_argument("--steer-coefficient", type=float, default=3.0)
    p.add_argument("--steer-tokens", type=int, default=30)
    args = p.parse_args()

    started = time.time()
    with ExitStack() as stack:
        url = args.url
        if url is None:
            from engine.default_model import ensure_default_model
            from tests.server_process import ServerProcess

            model = args.model or str(ensure_default_model())
            print(f"starting a server on {model} ...", file=sys.stderr)
            url = stack.enter_context(ServerProcess(model=model)).base_url
        out = run(Api(url, args.api_key), args)
    out["seconds"] = round(time.time() - started, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    print("IOI PATCHING OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
