"""How capture cost grows with tokens, layers hooked and number of hooks (the default model).

    python -m benchmarks.scaling [--quick] [--runs 3] [--decode 8]

Uses the engine directly (no server): `engine.generate.generate` with and without an
`engine.capture.Capture`, greedy, a prompt of P tokens then D generated tokens. Three sweeps:

- tokens: residual stream of all layers, prompt length P varies;
- layers: residual stream of the first L layers, P fixed;
- hooks: all layers, more components per layer (residual -> + attention, MLP -> + layernorm,
  Q, K, V -> + attention scores and patterns, + embedding: every hook point of the model).

Each configuration runs interleaved with the no-hook generation of the same prompt (rotating
order, several runs, medians); overhead = capture time / no-hook time - 1. A capture also
runs one extra forward step over the last generated token, so that every position has
activations: that cost is included. `shm write ms` is the time to write the capture into
shared memory as the server does (`shm.writer.write_capture`, pooled segment).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import engine  # noqa: F401  (OpenBLAS before mlx.core)

from benchmarks.report import MiB, machine_info, median, print_table, progress, write_result
from engine.capture import Capture
from engine.default_model import MODEL_ID, ensure_default_model
from engine.generate import generate
from engine.hooks import hook_specs, resolve_hooks
from engine.model import LoadedModel, load_model
from engine.params import SamplingParams
from engine.plan import plan
from engine.records import CaptureResult

TEXT = ("The history of computing is a story of abstraction layered on abstraction. Early machines were "
        "programmed by rewiring panels; later, stored programs let the same hardware run many tasks. "
        "Languages, compilers, operating systems and networks each hid the layer beneath. ")

COMPONENT_SETS = [
    ("residual", ["residual"]),
    ("+attn,mlp", ["residual", "attention", "mlp"]),
    ("+ln,q,k,v", ["residual", "attention", "mlp", "layernorm", "query", "key", "value"]),
    ("all 10", ["residual", "attention", "mlp", "layernorm", "query", "key", "value",
                "attention_scores", "attention_pattern", "embedding"]),
]


def prompt_ids(lm: LoadedModel, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += lm.tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:n]


def hooks_for(n_layers: int, components: list[str], layers: int | None = None) -> list[dict]:
    out = []
    for comp in components:
        if comp == "embedding":
            out.append({"layer_name": "transformer.wte", "component": "embedding", "hook_id": "embed"})
            continue
        for i in range(layers if layers is not None else n_layers):
            out.append({"layer_name": f"model.layers.{i}", "component": comp, "hook_id": f"{comp}_{i}"})
    return out


def run_once(lm: LoadedModel, prompt: list[int], decode: int, hooks: list[dict] | None):
    c0, t0 = time.process_time(), time.perf_counter()
    n, capture = 0, None
    for event in generate(plan(lm, prompt=prompt, sampling=SamplingParams(max_tokens=decode, temperature=0.0),
                               hooks=hooks)):
        n += 1
        capture = event.capture
    return (time.perf_counter() - t0, time.process_time() - c0), capture, n


def capture_bytes(capture: Capture) -> int:
    return sum(s.array.nbytes for r in capture.records for s in r.steps)


def shm_write_ms(lm: LoadedModel, capture: Capture, prompt: list[int], registry, i: int) -> float:
    from shm.writer import write_capture

    n_rows = max(s.start + s.n_tokens for r in capture.records for s in r.steps)
    token_ids = (prompt + [0] * n_rows)[: n_rows + 1]
    result = CaptureResult(f"scaling-{i}", lm.info.model_id, token_ids, ["t"] * len(token_ids), len(prompt),
                           capture.records)
    t0 = time.perf_counter()
    h = write_capture(result, registry)
    dt = (time.perf_counter() - t0) * 1e3
    registry.release(h.capture_id)
    return dt


def run_sweep(lm: LoadedModel, name: str, vary: str, configs: list[dict], runs: int, decode: int,
              registry) -> dict:
    """configs: {label, prompt_tokens, layers, hooks(list)}; bases run for each distinct prompt length."""
    prompts = sorted({c["prompt_tokens"] for c in configs})
    items = [("base", p, None) for p in prompts] + [(c["label"], c["prompt_tokens"], c) for c in configs]
    times: dict[tuple, list[float]] = {(lab, p): [] for lab, p, _ in items}
    cpu: dict[tuple, list[float]] = {(lab, p): [] for lab, p, _ in items}
    writes: dict[str, list[float]] = {c["label"]: [] for c in configs}
    sizes: dict[str, int] = {}
    generated: dict[tuple, int] = {}
    for lab, p, c in items:  # warm-up (compilation of shapes, allocator)
        run_once(lm, prompt_ids(lm, p), 2, c["hooks"] if c else None)
    for i in range(runs):
        k = i % len(items)
        for lab, p, c in items[k:] + items[:k]:
            progress(f"scaling: {name} run {i + 1}/{runs}: {lab} (prompt {p})")
            prompt = prompt_ids(lm, p)
            (dt, ct), cap, n = run_once(lm, prompt, decode, c["hooks"] if c else None)
            times[(lab, p)].append(dt)
            cpu[(lab, p)].append(ct)
            generated[(lab, p)] = n
            if cap is not None:
                sizes[lab] = capture_bytes(cap)
                if i < 2:  # the write is deterministic enough; two samples
                    writes[lab].append(shm_write_ms(lm, cap, prompt, registry, i))
            del cap
    rows = []
    for c in configs:
        bkey, ckey = ("base", c["prompt_tokens"]), (c["label"], c["prompt_tokens"])
        base, t = median(times[bkey]), median(times[ckey])
        rows.append({
            "label": c["label"], "prompt_tokens": c["prompt_tokens"], "decode_tokens": generated[(c["label"], c["prompt_tokens"])],
            "layers": c["layers"], "hooks": len(resolve_hooks(lm, hook_specs(c["hooks"]))),
            "components": c.get("components"),
            "capture_mib": sizes[c["label"]] / MiB, "base_ms": base * 1e3, "capture_ms": t * 1e3,
            "overhead_pct": (t / base - 1) * 100,
            "overhead_best_pct": (min(times[ckey]) / min(times[bkey]) - 1) * 100,
            "overhead_cpu_pct": (median(cpu[ckey]) / median(cpu[bkey]) - 1) * 100,
            "shm_write_ms": median(writes[c["label"]]),
            "base_samples_ms": [x * 1e3 for x in times[("base", c["prompt_tokens"])]],
            "capture_samples_ms": [x * 1e3 for x in times[(c["label"], c["prompt_tokens"])]],
        })
    return {"name": name, "vary": vary, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--decode", type=int, default=8, help="generated tokens per run")
    ap.add_argument("--prompt", type=int, default=256, help="prompt length for the layer and hook sweeps")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="prompt lengths of the token sweep")
    ap.add_argument("--model", default=None, help="model path (default: SmolLM2-135M)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    runs = args.runs or (2 if args.quick else 3)
    tokens = args.tokens or ([64, 256, 512] if args.quick else [32, 128, 512, 768])

    progress("scaling: loading the model")
    lm = load_model(args.model or str(ensure_default_model()), None if args.model else MODEL_ID)
    n_layers = lm.info.n_layers
    layer_counts = [1, 8, n_layers] if args.quick else sorted({1, 4, n_layers // 2, n_layers})
    comp_sets = COMPONENT_SETS[::3] + COMPONENT_SETS[1:2] if args.quick else COMPONENT_SETS
    comp_sets = sorted(comp_sets, key=lambda cs: len(cs[1]))

    from shm import ShmRegistry

    sweeps = []
    with tempfile.TemporaryDirectory() as state, ShmRegistry(state_dir=state) as registry:
        sweeps.append(run_sweep(lm, "tokens (residual, all layers)", "prompt_tokens", [
            {"label": f"P={p}", "prompt_tokens": p, "layers": n_layers, "components": ["residual"],
             "hooks": hooks_for(n_layers, ["residual"])} for p in tokens], runs, args.decode, registry))
        sweeps.append(run_sweep(lm, f"layers (residual, prompt {args.prompt})", "layers", [
            {"label": f"L={n}", "prompt_tokens": args.prompt, "layers": n, "components": ["residual"],
             "hooks": hooks_for(n_layers, ["residual"], n)} for n in layer_counts], runs, args.decode, registry))
        sweeps.append(run_sweep(lm, f"hooks (all layers, prompt {args.prompt})", "hooks", [
            {"label": label, "prompt_tokens": args.prompt, "layers": n_layers, "components": comps,
             "hooks": hooks_for(n_layers, comps)} for label, comps in comp_sets], runs, args.decode, registry))

    for s in sweeps:
        print(f"\nscaling: {s['name']}")
        print_table(["config", "prompt", "layers", "hooks", "capture MiB", "no hooks ms", "capture ms", "overhead",
                     "best-of", "cpu time", "shm write ms"],
                    [[r["label"], r["prompt_tokens"], r["layers"], r["hooks"], r["capture_mib"], r["base_ms"],
                      r["capture_ms"], f"{r['overhead_pct']:+.1f}%", f"{r['overhead_best_pct']:+.1f}%",
                      f"{r['overhead_cpu_pct']:+.1f}%", r["shm_write_ms"]] for r in s["rows"]])
    result = {
        "benchmark": "scaling", "machine": machine_info(), "quick": args.quick, "runs": runs,
        "model": lm.info.to_dict(), "decode_tokens": args.decode,
        "description": (f"Engine only, {lm.info.model_id} (float32), greedy, prompt P then {args.decode} generated "
                        f"tokens; each config interleaved with the same generation without hooks, {runs} runs. "
                        "overhead: median wall time; best-of: fastest run over fastest run; cpu time: median process "
                        "CPU time (both less sensitive to other load on the machine). Overhead includes the extra "
                        "forward step that gives the last token its activations."),
        "sweeps": sweeps,
    }
    path = write_result("scaling", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
