"""What interventions cost in generation, and an activation-patching sweep, on the default model.

    python -m benchmarks.interventions [--quick] [--tl-python PATH] [--parts steering ablation patching]

Engine level (no HTTP), greedy; each comparison is measured side by side in this run
(interleaved, the order rotating each round, after a warm-up; medians):

  steering  a chat prompt of --prompt tokens + --decode generated tokens: plain vs one `add`
            steering vector at blocks.15.hook_resid_post on every position (a fixed random unit
            vector x --coefficient, 64: about a third of the residual stream's norm there, enough
            to change the greedy text; x 4 changes only the logits' last digits). Target: <= 1.05x
            the plain generation's wall time.
  ablation  a head-ablation sweep: for each of the 30 layers, one run zeroing head 0's output
            (blocks.L.attn.hook_z, op zero, heads [0]) beside one plain run of the same prompt and
            max_tokens (--ablate-decode); the ratio of the two sweeps' total wall times.
  patching  an IOI-style activation-patching sweep (the recipe of the HTTP contract, in-process):
            one clean run capturing blocks.L.hook_resid_pre of every layer (max_tokens 1), then 30
            corrupted runs each patching one layer at every prompt position from it
            (engine.interventions.sources_from), with the log-probabilities of " Mary" and " John"
            (the logit difference); beside the same 31 runs without capture or patch. When
            TransformerLens is available (importable here, or an interpreter given by --tl-python
            or $NSBRIDGE_TL_PYTHON, as for reference_transformerlens) a worker process runs the
            same sweep with run_with_cache (clean) and run_with_hooks (a hook_resid_pre patch per
            layer) on the same model and token ids, driven run by run, so the four sweeps
            (MLX and TransformerLens, patched and plain) interleave run by run, the order rotating
            at each step; otherwise that part is skipped with the reason. A sweep's time is the
            sum of its 31 runs' wall times (each side timing its own runs). The worker runs torch
            with OMP_WAIT_POLICY=PASSIVE unless it is set (spinning OpenMP threads made each short
            forward ~10x slower on a machine with other load); --tl-threads sets torch's threads.

Sanity, recorded in the result: the positions each intervention touched at each step (the patch:
the P prompt positions at step 0 only; steering and ablation: P, then 1 per decode step), that
the steered text differs from the plain one, how many ablations changed the generated tokens,
the patching curve (logit difference per layer), and, with TransformerLens, the largest
difference between the two implementations' curves. Prints tables and writes
benchmarks/results/interventions.json.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import machine_info, median, percentile, print_table, progress, write_result

ROOT = Path(__file__).resolve().parent.parent
STEER_SITE = "blocks.{layer}.hook_resid_post"
STEER_COEFFICIENT = 64.0  # x a unit vector; the residual norm there is ~170 (x 4 leaves the greedy text as it was)
STEER_TARGET = 1.05
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
PARTS = ("steering", "ablation", "patching")
ANSWER, FOIL = " Mary", " John"  # the clean prompt's answer, and the corrupted one's


# --- the TransformerLens half (a worker process in whichever interpreter has transformer_lens) ---
def tl_worker() -> None:
    """Read one JSON command per line on stdin, answer one JSON line each on the real stdout
    (everything else the libraries print goes to stderr). Commands: init (boot the model), clean
    (the clean run: run_with_cache of the sites, or a plain forward), run (one corrupted run: a
    patch of one layer from the last clean cache, or a plain forward), quit. Each run is timed
    here (wall and process CPU time) and answers with its logit difference."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformer_lens
    from transformer_lens.model_bridge import TransformerBridge

    state: dict = {}

    def init(spec: dict) -> dict:
        torch.manual_seed(0)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        bridge = TransformerBridge.boot_transformers(spec["model_dir"], device="cpu", dtype=torch.float32)
        state.update(bridge=bridge, spec=spec, clean=torch.tensor([spec["clean_ids"]], dtype=torch.long),
                     corrupt=torch.tensor([spec["corrupt_ids"]], dtype=torch.long), cache=None)
        missing = [s for s in spec["sites"] if s not in bridge.hook_dict]
        if missing:
            raise RuntimeError(f"TransformerLens has no hook {missing[0]}")
        try:
            from importlib.metadata import version

            tl_version = version("transformer-lens")
        except Exception:
            tl_version = getattr(transformer_lens, "__version__", "?")
        return {"transformer_lens": tl_version, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}

    def logit_diff(logits) -> float:
        last = logits[0, -1].float()
        return float(last[state["spec"]["answer"]] - last[state["spec"]["foil"]])

    def clean(patch: bool):
        bridge, sites = state["bridge"], set(state["spec"]["sites"])
        if patch:
            logits, state["cache"] = bridge.run_with_cache(state["clean"], names_filter=lambda n: n in sites)
        else:
            logits = bridge(state["clean"])
        return logits

    def run(patch: bool, layer: int):
        bridge = state["bridge"]
        if not patch:
            return bridge(state["corrupt"])
        site, cache = state["spec"]["sites"][layer], state["cache"]
        n = state["corrupt"].shape[1]

        def hook(value, hook):  # every prompt position, from the clean run
            value[:, :n] = cache[site][:, :n]
            return value

        return bridge.run_with_hooks(state["corrupt"], fwd_hooks=[(site, hook)])

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "init":
                out = init(cmd)
            else:
                c0, t0 = time.process_time(), time.perf_counter()
                with torch.inference_mode():
                    logits = clean(cmd["patch"]) if cmd["cmd"] == "clean" else run(cmd["patch"], cmd["layer"])
                out = {"total_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                       "logit_diff": logit_diff(logits)}
            out["ok"] = True
        except Exception as exc:  # reported to the driver
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(out) + "\n")
        proto.flush()


def _tl_python(explicit: str | None) -> tuple[str | None, str]:
    """The interpreter with transformer_lens, and where it came from (or why there is none)."""
    if importlib.util.find_spec("transformer_lens") is not None:
        return sys.executable, "importable in this interpreter"
    cand = explicit or os.environ.get("NSBRIDGE_TL_PYTHON")
    if cand and Path(cand).exists():
        return cand, "--tl-python" if explicit else "$NSBRIDGE_TL_PYTHON"
    if cand:
        return None, f"the TransformerLens interpreter {cand!r} does not exist"
    return None, ("transformer_lens is not installed: the TransformerLens sweep is skipped. Install it "
                  "(`pip install transformer-lens`, with torch) in this venv, or in another one and pass "
                  "--tl-python /path/to/python or set NSBRIDGE_TL_PYTHON.")


class TLWorker:
    """A TransformerLens worker process, one sweep per call."""

    def __init__(self, python: str, spec: dict):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
               # torch's OpenMP threads spin-wait by default: with other load on the machine that made each
               # short forward ~10x slower here (OpenBLAS's threads, which MLX uses, yield instead).
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.proc = subprocess.Popen([python, "-m", "benchmarks.interventions", "--tl-worker"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
        self.info = self.call({"cmd": "init", **spec})

    def call(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the TransformerLens worker exited (code {self.proc.wait()})")
        out = json.loads(line)
        if not out.pop("ok"):
            raise RuntimeError(f"the TransformerLens worker failed: {out['error']}")
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


# --- the MLX side ------------------------------------------------------------------------------------
class Engine:
    def __init__(self, lm):
        import engine  # noqa: F401  (OpenBLAS before mlx.core)
        from engine.generate import generate
        from engine.interventions import sources_from
        from engine.params import LogprobOptions, SamplingParams
        from engine.plan import plan

        self.lm = lm
        self._generate, self._plan, self._sources_from = generate, plan, sources_from
        self._sampling, self._logprobs = SamplingParams, LogprobOptions

    def run(self, prompt, max_tokens: int, *, hooks=None, interventions=None, captures=(), token_ids=None,
            logprobs: bool = False) -> dict:
        """One greedy generation, timed (planning included, as a request pays it)."""
        gc.collect()  # MLX's buffer cache is kept, as in a running server
        c0, t0 = time.process_time(), time.perf_counter()
        sources = self._sources_from(*captures) if captures else None
        p = self._plan(self.lm, prompt=prompt, sampling=self._sampling(max_tokens=max_tokens, temperature=0.0),
                       hooks=hooks, interventions=interventions, sources=sources,
                       logprobs=self._logprobs(token_ids=token_ids or [], logprobs=logprobs)
                       if token_ids or logprobs else None)
        stamps = []  # when each token arrived
        for ev in self._generate(p):
            stamps.append(time.perf_counter())
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        first = stamps[0]
        res = ev.result
        return {"total_s": total, "cpu_s": cpu, "prefill_s": first - t0, "decode_s": total - (first - t0),
                "step_s": [b - a for a, b in zip(stamps, stamps[1:])],  # one decode step each
                "result": res, "tokens": res.token_ids[res.prompt_tokens:], "text": res.text,
                "logprobs": [lp.logprob for lp in res.logprobs] if logprobs else None,
                "touched": [iv["positions_touched"] for iv in res.interventions]}


def _expected_touched(prompt_tokens: int, generated: int) -> list[int]:
    """Positions an 'all'-positions intervention touches at each step without a capture: the
    prompt at step 0, one token per later step (the last token is never run)."""
    return [prompt_tokens] + [1] * (generated - 1)


def bench_steering(eng: Engine, args, prompt: list[int]) -> dict:
    import numpy as np

    lm = eng.lm
    layer = min(args.steer_layer, lm.info.n_layers - 1)
    site = STEER_SITE.format(layer=layer)
    rng = np.random.default_rng(0)
    v = rng.standard_normal(lm.info.d_model)
    v = (v / np.linalg.norm(v)).astype(np.float32)
    spec = [{"layer_name": site, "op": "add", "vector": v.tolist(), "coefficient": args.coefficient,
             "positions": "all"}]
    # For scale: the residual stream's norm at that site over the prompt (one untimed run).
    probe = eng.run(prompt, 1, hooks=[{"layer_name": site}])
    resid_norm = float(np.median(np.linalg.norm(probe["result"].activations[site], axis=-1)))
    del probe

    variants = {"plain": None, "steered": spec}
    names = list(variants)
    samples: dict[str, list[dict]] = {k: [] for k in names}
    for rnd in range(args.runs + 1):  # round 0 warms up
        for name in names[rnd % 2:] + names[:rnd % 2]:
            r = eng.run(prompt, args.decode, interventions=variants[name])
            progress(f"steering round {rnd}{' (warm-up)' if rnd == 0 else ''} {name:8s} {r['total_s']:.2f}s "
                     f"({len(r['tokens'])} tokens)")
            r.pop("result")
            if rnd:
                samples[name].append(r)
    plain, steered = samples["plain"], samples["steered"]
    ratio = {k: median([r[k] for r in steered]) / median([r[k] for r in plain])
             for k in ("total_s", "prefill_s", "decode_s", "cpu_s")}
    ratio_best = min(r["total_s"] for r in steered) / min(r["total_s"] for r in plain)
    # Every decode step of every round pooled: the median step is far less sensitive to other load on
    # the machine than a whole generation's wall time (load comes in bursts of seconds).
    steps = {k: [x for r in samples[k] for x in r["step_s"]] for k in names}
    step_median = {k: median(steps[k]) for k in names}
    step_p25 = {k: percentile(steps[k], 25) for k in names}
    n_gen = len(steered[0]["tokens"])
    expected = [_expected_touched(len(prompt), n_gen)]
    rows = []
    for name in names:
        rs = samples[name]
        total = median([r["total_s"] for r in rs])
        rows.append({"variant": name, "total_s": round(total, 3), "tokens_generated": len(rs[0]["tokens"]),
                     "tokens_per_s": round((len(prompt) + len(rs[0]["tokens"])) / total, 1),
                     "ratio_total": 1.0 if name == "plain" else round(ratio["total_s"], 3),
                     "ratio_prefill": 1.0 if name == "plain" else round(ratio["prefill_s"], 3),
                     "ratio_decode": 1.0 if name == "plain" else round(ratio["decode_s"], 3),
                     "ratio_best": 1.0 if name == "plain" else round(ratio_best, 3),
                     "ratio_cpu": 1.0 if name == "plain" else round(ratio["cpu_s"], 3),
                     "step_ms_median": round(step_median[name] * 1e3, 2), "step_ms_p25": round(step_p25[name] * 1e3, 2),
                     "ratio_step_median": round(step_median[name] / step_median["plain"], 3),
                     "ratio_step_p25": round(step_p25[name] / step_p25["plain"], 3),
                     "target": None if name == "plain" else STEER_TARGET,
                     "runs_total_s": [round(r["total_s"], 3) for r in rs]})
    return {
        "site": site, "coefficient": args.coefficient, "vector": "fixed random unit vector (numpy seed 0)",
        "residual_norm_median": round(resid_norm, 2), "prompt_tokens": len(prompt), "decode_tokens": args.decode,
        "runs": args.runs, "rows": rows, "ratio": round(ratio["total_s"], 3), "target": STEER_TARGET,
        "target_met": ratio["total_s"] <= STEER_TARGET,
        "ratio_step_median": round(step_median["steered"] / step_median["plain"], 3),
        "target_met_step_median": step_median["steered"] / step_median["plain"] <= STEER_TARGET,
        "text_differs": plain[0]["text"] != steered[0]["text"],
        "tokens_differ": plain[0]["tokens"] != steered[0]["tokens"],
        "deterministic": all(r["tokens"] == plain[0]["tokens"] for r in plain)
        and all(r["tokens"] == steered[0]["tokens"] for r in steered),
        "plain_text": plain[0]["text"], "steered_text": steered[0]["text"],
        "positions_touched": steered[0]["touched"], "positions_touched_expected": expected,
        "positions_touched_ok": all(r["touched"] == expected for r in steered),
    }


def bench_ablation(eng: Engine, args, prompt: str) -> dict:
    lm = eng.lm
    n = lm.info.n_layers

    def spec(layer):
        return [{"layer_name": f"blocks.{layer}.attn.hook_z", "op": "zero", "heads": [args.head]}]

    for s in (None, spec(0)):  # warm-up
        eng.run(prompt, args.ablate_decode, interventions=s, logprobs=True)
    plain, ablated, changed, moved, touched_ok = [], [], 0, 0, True
    for layer in range(n):
        order = ("plain", "ablated") if layer % 2 == 0 else ("ablated", "plain")
        for name in order:
            r = eng.run(prompt, args.ablate_decode, interventions=spec(layer) if name == "ablated" else None,
                        logprobs=True)
            r.pop("result")
            (plain if name == "plain" else ablated).append(r)
        a, p = ablated[-1], plain[-1]
        changed += a["tokens"] != p["tokens"]
        moved += a["logprobs"] != p["logprobs"]  # the log-probability of some generated token moved
        expected = [_expected_touched(args.ioi_tokens, len(a["tokens"]))]
        touched_ok &= a["touched"] == expected
        progress(f"ablation layer {layer:2d}: plain {p['total_s'] * 1e3:.0f} ms, head {args.head} zeroed "
                 f"{a['total_s'] * 1e3:.0f} ms{' (output changed)' if a['tokens'] != p['tokens'] else ''}")
    total_p, total_a = sum(r["total_s"] for r in plain), sum(r["total_s"] for r in ablated)
    cpu_p, cpu_a = sum(r["cpu_s"] for r in plain), sum(r["cpu_s"] for r in ablated)
    return {
        "site": "blocks.L.attn.hook_z (head_output)", "head": args.head, "layers": n, "prompt": prompt,
        "prompt_tokens": args.ioi_tokens, "decode_tokens": args.ablate_decode,
        "plain_total_s": round(total_p, 3), "ablated_total_s": round(total_a, 3),
        "ratio": round(total_a / total_p, 3), "ratio_cpu": round(cpu_a / cpu_p, 3),
        "ratio_median_run": round(median([r["total_s"] for r in ablated]) / median([r["total_s"] for r in plain]), 3),
        "plain_ms_per_run": round(total_p / n * 1e3, 1), "ablated_ms_per_run": round(total_a / n * 1e3, 1),
        "ablations_changing_output": changed, "ablations_changing_logprobs": moved,
        "positions_touched_example": ablated[0]["touched"],
        "positions_touched_ok": touched_ok,
    }


def bench_patching(eng: Engine, args, worker: TLWorker | None, clean_ids, corrupt_ids, answer: int, foil: int) -> dict:
    """Per round: each variant's clean run, then layer by layer each variant's corrupted run, the
    variants' order rotating at every step (so load from elsewhere on the machine falls on all
    of them alike). A sweep's time is the sum of its 31 runs' wall times."""
    lm = eng.lm
    n = lm.info.n_layers
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(n)]
    P = len(corrupt_ids)
    caps: dict[bool, object] = {}

    def logit_diff(r) -> float:
        lp = dict(r["result"].logprobs[0].targets)
        return lp[answer] - lp[foil]

    def mlx_clean(patch: bool) -> dict:
        r = eng.run(CLEAN, 1, hooks=[{"layer_name": s} for s in sites] if patch else None, token_ids=[answer, foil])
        caps[patch] = r["result"].capture
        return {"total_s": r["total_s"], "cpu_s": r["cpu_s"], "logit_diff": logit_diff(r), "touched": None}

    def mlx_run(patch: bool, layer: int) -> dict:
        iv, cap = None, caps[patch]
        if patch:
            iv = [{"layer_name": sites[layer], "op": "patch", "positions": "prompt",
                   "source": {"capture_id": cap.capture_id, "hook_id": sites[layer]}}]
        r = eng.run(CORRUPT, 1, interventions=iv, captures=(cap,) if patch else (), token_ids=[answer, foil])
        return {"total_s": r["total_s"], "cpu_s": r["cpu_s"], "logit_diff": logit_diff(r), "touched": r["touched"]}

    variants = {"mlx_patch": (mlx_clean, mlx_run, True), "mlx_plain": (mlx_clean, mlx_run, False)}
    if worker is not None:
        def tl_clean(patch):
            return worker.call({"cmd": "clean", "patch": patch})

        def tl_run(patch, layer):
            return worker.call({"cmd": "run", "patch": patch, "layer": layer})

        variants["tl_patch"] = (tl_clean, tl_run, True)
        variants["tl_plain"] = (tl_clean, tl_run, False)
    names = list(variants)
    sweeps: dict[str, list[dict]] = {k: [] for k in names}
    for rnd in range(args.patch_rounds + 1):  # round 0 warms up
        cur = {k: {"clean": None, "runs": []} for k in names}
        for step in range(n + 1 if rnd else 3):  # step 0: the clean runs; then one corrupted run per layer
            k = (rnd + step) % len(names)
            for name in names[k:] + names[:k]:
                clean_fn, run_fn, patch = variants[name]
                if step == 0:
                    cur[name]["clean"] = clean_fn(patch)
                else:
                    cur[name]["runs"].append(run_fn(patch, step - 1))
            if rnd and step % 10 == 0:
                progress(f"patching round {rnd}: {step}/{n} layers")
        caps.clear()
        for name in names:
            c, runs = cur[name]["clean"], cur[name]["runs"]
            s = {"sweep_s": c["total_s"] + sum(r["total_s"] for r in runs),
                 "cpu_s": c["cpu_s"] + sum(r["cpu_s"] for r in runs), "clean_s": c["total_s"],
                 "runs_s": [r["total_s"] for r in runs], "clean_logit_diff": c["logit_diff"],
                 "logit_diffs": [r["logit_diff"] for r in runs], "touched": [r.get("touched") for r in runs]}
            progress(f"patching round {rnd}{' (warm-up)' if rnd == 0 else ''} {name:9s} sweep {s['sweep_s']:.2f}s "
                     f"(clean {s['clean_s'] * 1e3:.0f} ms, {len(runs)} runs, "
                     f"median {median(s['runs_s']) * 1e3:.0f} ms)")
            if rnd:
                sweeps[name].append(s)

    def summary(name: str) -> dict:
        rs = sweeps[name]
        return {"sweep_s": round(median([r["sweep_s"] for r in rs]), 3),
                "sweep_best_s": round(min(r["sweep_s"] for r in rs), 3),
                "cpu_s": round(median([r["cpu_s"] for r in rs]), 3),
                "clean_ms": round(median([r["clean_s"] for r in rs]) * 1e3, 1),
                "run_ms": round(median([x for r in rs for x in r["runs_s"]]) * 1e3, 1),
                "run_ms_by_layer": [round(median([r["runs_s"][i] for r in rs]) * 1e3, 1) for i in range(n)],
                "sweeps_s": [round(r["sweep_s"], 3) for r in rs]}

    mlx = {k.split("_", 1)[1]: summary(k) for k in names if k.startswith("mlx")}
    first = sweeps["mlx_patch"][0]
    expected = [[P]]  # one intervention, the prompt's P positions at step 0 and nothing after
    clean_ld, corrupt_ld = first["clean_logit_diff"], sweeps["mlx_plain"][0]["logit_diffs"][0]
    span = clean_ld - corrupt_ld
    out = {
        "prompts": {"clean": CLEAN, "corrupted": CORRUPT}, "prompt_tokens": P, "answer": ANSWER, "foil": FOIL,
        "sites": f"blocks.L.hook_resid_pre, L = 0..{n - 1}", "layers": n, "rounds": args.patch_rounds,
        "mlx": mlx, "mlx_patch_over_plain": round(mlx["patch"]["sweep_s"] / mlx["plain"]["sweep_s"], 3),
        "mlx_patch_over_plain_cpu": round(mlx["patch"]["cpu_s"] / mlx["plain"]["cpu_s"], 3),
        "positions_touched": first["touched"][0], "positions_touched_expected": expected,
        "positions_touched_ok": all(t == expected for r in sweeps["mlx_patch"] for t in r["touched"]),
        "clean_logit_diff": round(clean_ld, 4), "corrupted_logit_diff": round(corrupt_ld, 4),
        "logit_diffs": [round(x, 4) for x in first["logit_diffs"]],
        "patched_fraction": [round((x - corrupt_ld) / span, 4) if span else None for x in first["logit_diffs"]],
        "deterministic": all(r["logit_diffs"] == first["logit_diffs"] for r in sweeps["mlx_patch"]),
        "note": ("Patching the residual stream at every prompt position restores the clean run exactly, so the "
                 "patched fraction is 1 at every layer (a check of the patch, not an IOI finding). MLX evaluates "
                 "lazily: with the residual replaced at every prompt position, the layers below the patch are not "
                 "needed for the first token and are not computed, so a run costs less the later its layer "
                 "(run_ms_by_layer); TransformerLens computes every layer."),
    }
    if worker is not None:
        tl = {k.split("_", 1)[1]: summary(k) for k in names if k.startswith("tl")}
        tl_first = sweeps["tl_patch"][0]
        gaps = [abs(a - b) for a, b in zip(first["logit_diffs"], tl_first["logit_diffs"])]
        gaps += [abs(clean_ld - tl_first["clean_logit_diff"]),
                 abs(corrupt_ld - sweeps["tl_plain"][0]["logit_diffs"][0])]
        out["transformerlens"] = {
            **tl, **worker.info,
            "tl_patch_over_plain": round(tl["patch"]["sweep_s"] / tl["plain"]["sweep_s"], 3),
            "clean_logit_diff": round(tl_first["clean_logit_diff"], 4),
            "logit_diffs": [round(x, 4) for x in tl_first["logit_diffs"]],
            "logit_diff_max_abs_diff": max(gaps),
        }
        out["ratio_vs_transformerlens"] = round(mlx["patch"]["sweep_s"] / tl["patch"]["sweep_s"], 3)
        out["ratio_vs_transformerlens_best"] = round(mlx["patch"]["sweep_best_s"] / tl["patch"]["sweep_best_s"], 3)
        out["ratio_vs_transformerlens_cpu"] = round(mlx["patch"]["cpu_s"] / tl["patch"]["cpu_s"], 3)
    return out


# --- driver ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--tl-worker":
        tl_worker()
        return {}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter generations")
    ap.add_argument("--prompt", type=int, default=128, help="steering: prompt tokens")
    ap.add_argument("--decode", type=int, default=None, help="steering: generated tokens (64; --quick 32)")
    ap.add_argument("--runs", type=int, default=None, help="steering: measured rounds (3; --quick 2)")
    ap.add_argument("--steer-layer", type=int, default=15, help="steering: the layer of hook_resid_post")
    ap.add_argument("--coefficient", type=float, default=STEER_COEFFICIENT,
                    help="steering: the unit vector's multiplier (64)")
    ap.add_argument("--ablate-decode", type=int, default=None,
                    help="ablation: generated tokens per run (16; --quick 8)")
    ap.add_argument("--head", type=int, default=0, help="ablation: the head zeroed")
    ap.add_argument("--patch-rounds", type=int, default=None,
                    help="patching: measured sweeps of each kind (5; --quick 2)")
    ap.add_argument("--tl-python", default=None, help="an interpreter with transformer_lens (or $NSBRIDGE_TL_PYTHON)")
    ap.add_argument("--tl-threads", type=int, default=None,
                    help="torch threads of the TransformerLens side (default: torch's own, one per core)")
    ap.add_argument("--model", default=None, help="Hugging Face-layout model folder (default: SmolLM2-135M)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run (all)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.decode = args.decode or (32 if args.quick else 64)
    args.runs = args.runs or (2 if args.quick else 3)
    args.ablate_decode = args.ablate_decode or (8 if args.quick else 16)
    args.patch_rounds = args.patch_rounds or (2 if args.quick else 5)

    import engine  # noqa: F401  (OpenBLAS before mlx.core)
    from benchmarks.capture_overhead import build_prompt
    from engine.model import load_model

    if args.model:
        model_dir, model_id = args.model, None
    else:
        from engine.default_model import MODEL_ID, ensure_default_model

        model_dir, model_id = str(ensure_default_model()), MODEL_ID
    lm = load_model(model_dir, model_id)
    eng = Engine(lm)
    clean_ids, corrupt_ids = lm.text_prompt(CLEAN), lm.text_prompt(CORRUPT)
    if len(clean_ids) != len(corrupt_ids):
        raise SystemExit(f"the clean and corrupted prompts have {len(clean_ids)} and {len(corrupt_ids)} tokens on "
                         f"{lm.info.model_id}: patching needs equal lengths")
    pair = [lm.tokenizer.encode(w, add_special_tokens=False) for w in (ANSWER, FOIL)]
    if any(len(t) != 1 for t in pair):
        raise SystemExit(f"{ANSWER!r} and {FOIL!r} must be one token each on {lm.info.model_id} (got {pair})")
    answer, foil = pair[0][0], pair[1][0]
    args.ioi_tokens = len(corrupt_ids)
    prompt = build_prompt(lm, args.prompt)
    t_start = time.perf_counter()
    result = {"model": lm.info.to_dict(), "quick": args.quick, "parts": args.parts}
    print(f"\ninterventions: {lm.info.model_id}, engine level, greedy")

    if "steering" in args.parts:
        progress(f"{lm.info.model_id}: steering, prompt {len(prompt)} tokens + {args.decode} decoded, "
                 f"{args.runs} rounds")
        result["steering"] = bench_steering(eng, args, prompt)
        print_steering(result["steering"])
    if "ablation" in args.parts:
        progress(f"ablation sweep: {lm.info.n_layers} layers x (plain, head {args.head} zeroed), "
                 f"{args.ablate_decode} decoded tokens each")
        result["ablation"] = bench_ablation(eng, args, CLEAN)
        print_ablation(result["ablation"])
    if "patching" in args.parts:
        python, why = _tl_python(args.tl_python)
        worker = tl_error = None
        if python is not None:
            progress(f"patching: TransformerLens worker in {python} ({why})")
            try:
                worker = TLWorker(python, {"model_dir": model_dir, "clean_ids": clean_ids, "corrupt_ids": corrupt_ids,
                                           "sites": [f"blocks.{i}.hook_resid_pre" for i in range(lm.info.n_layers)],
                                           "answer": answer, "foil": foil, "threads": args.tl_threads})
            except Exception as exc:
                tl_error = f"the TransformerLens worker could not start: {exc}"
                progress(tl_error)
        else:
            tl_error = why
        progress(f"patching sweep: {lm.info.n_layers} layers, {args.patch_rounds} rounds"
                 + (", with TransformerLens" if worker else ", MLX only"))
        try:
            patching = bench_patching(eng, args, worker, clean_ids, corrupt_ids, answer, foil)
        finally:
            if worker is not None:
                worker.close()
        patching["transformerlens_skipped"] = worker is None
        if worker is None:
            patching["transformerlens_reason"] = tl_error
        patching["tl_python"] = python
        result["patching"] = patching
        print_patching(patching)

    result["description"] = (
        f"Engine level (no HTTP), {lm.info.model_id}, greedy. Steering: median of {args.runs} interleaved rounds "
        "after a warm-up, plain vs steered generation. Ablation: one plain and one ablated run per layer, "
        "interleaved; ratio of the sweeps' total wall times. Patching: clean capture + 30 patched corrupted runs "
        "(max_tokens 1), beside 31 plain runs (and TransformerLens's sweep when available), interleaved run by "
        f"run; a sweep's time is the sum of its runs' wall times, median of {args.patch_rounds} rounds after a "
        "warm-up. Planning (tokenizing, resolving) is inside every timed MLX run; TransformerLens is given the "
        "same token ids.")
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["machine"] = machine_info()
    path = write_result("interventions", result, args.out)
    progress(f"wrote {path}")
    return result


# --- tables ------------------------------------------------------------------------------------------
def print_steering(st: dict) -> None:
    print(f"\nsteering: add (random unit vector x {st['coefficient']:g}, residual norm there ~"
          f"{st['residual_norm_median']:.0f}) at {st['site']}, all positions; prompt {st['prompt_tokens']} + "
          f"{st['decode_tokens']} decoded, median of {st['runs']} rounds")
    print_table(["variant", "total s", "tok/s", "x plain", "x prefill", "x decode", "x best", "x cpu",
                 "step ms", "x step", "target"],
                [[r["variant"], r["total_s"], r["tokens_per_s"], r["ratio_total"], r["ratio_prefill"],
                  r["ratio_decode"], r["ratio_best"], r["ratio_cpu"], r["step_ms_median"], r["ratio_step_median"],
                  r["target"]] for r in st["rows"]])
    print(f"target <= {st['target']}x: {'met' if st['target_met'] else 'NOT met'} ({st['ratio']:.3f}x wall time; "
          f"{st['ratio_step_median']:.3f}x median decode step, all rounds' steps pooled: "
          f"{'met' if st['target_met_step_median'] else 'NOT met'}); "
          f"steered text differs from plain: {st['text_differs']}; positions touched as expected: "
          f"{st['positions_touched_ok']} ([{st['prompt_tokens']}, 1 x {st['decode_tokens'] - 1}])")


def print_ablation(ab: dict) -> None:
    print(f"\nablation sweep: zero head {ab['head']} of blocks.L.attn.hook_z, one run per layer "
          f"({ab['layers']}), prompt {ab['prompt_tokens']} tokens + {ab['decode_tokens']} decoded")
    print_table(["sweep", "runs", "total s", "ms per run", "x plain", "x cpu"],
                [["plain", ab["layers"], ab["plain_total_s"], ab["plain_ms_per_run"], 1.0, 1.0],
                 ["head ablated", ab["layers"], ab["ablated_total_s"], ab["ablated_ms_per_run"], ab["ratio"],
                  ab["ratio_cpu"]]])
    print(f"ablations that changed the output: {ab['ablations_changing_output']}/{ab['layers']}, "
          f"the generated tokens' log-probabilities: {ab['ablations_changing_logprobs']}/{ab['layers']}; "
          f"positions touched as expected: {ab['positions_touched_ok']}")


def print_patching(pa: dict) -> None:
    print(f"\npatching sweep: clean capture of {pa['layers']} x hook_resid_pre, then {pa['layers']} corrupted runs "
          f"each patching one layer at the {pa['prompt_tokens']} prompt positions; median of {pa['rounds']} sweeps")
    mlx = pa["mlx"]
    rows = [["nsbridge (MLX)", "patch sweep", mlx["patch"]["sweep_s"], mlx["patch"]["clean_ms"],
             mlx["patch"]["run_ms"], mlx["patch"]["cpu_s"]],
            ["nsbridge (MLX)", "31 plain runs", mlx["plain"]["sweep_s"], mlx["plain"]["clean_ms"],
             mlx["plain"]["run_ms"], mlx["plain"]["cpu_s"]]]
    tl = pa.get("transformerlens")
    if tl:
        label = f"TransformerLens {tl['transformer_lens']} ({tl['torch_threads']} thr)"
        rows += [[label, "patch sweep", tl["patch"]["sweep_s"], tl["patch"]["clean_ms"], tl["patch"]["run_ms"],
                  tl["patch"]["cpu_s"]],
                 [label, "31 plain forwards", tl["plain"]["sweep_s"], tl["plain"]["clean_ms"], tl["plain"]["run_ms"],
                  tl["plain"]["cpu_s"]]]
    print_table(["implementation", "what", "sweep s", "clean ms", "ms per run", "cpu s"], rows)
    print(f"patch sweep / plain runs (MLX): {pa['mlx_patch_over_plain']:.2f}x "
          f"(cpu {pa['mlx_patch_over_plain_cpu']:.2f}x); positions touched per patch: {pa['positions_touched']} "
          f"(expected {pa['positions_touched_expected']}: {pa['positions_touched_ok']})")
    print("MLX patched run ms by layer (lazy evaluation skips the layers below a full patch): "
          + " ".join(f"{x:.0f}" for x in mlx["patch"]["run_ms_by_layer"]))
    print(f"logit diff {pa['answer']!r} - {pa['foil']!r}: clean {pa['clean_logit_diff']:.3f}, corrupted "
          f"{pa['corrupted_logit_diff']:.3f}; patched fraction by layer: "
          + " ".join(f"{x:.2f}" for x in pa["patched_fraction"] if x is not None))
    if tl:
        print(f"MLX sweep / TransformerLens sweep: {pa['ratio_vs_transformerlens']:.2f}x (best-of "
              f"{pa['ratio_vs_transformerlens_best']:.2f}x, cpu {pa['ratio_vs_transformerlens_cpu']:.2f}x); "
              f"logit-difference curves agree to {tl['logit_diff_max_abs_diff']:.1e}")
    else:
        print(f"TransformerLens: skipped: {pa.get('transformerlens_reason')}")


if __name__ == "__main__":
    main()
