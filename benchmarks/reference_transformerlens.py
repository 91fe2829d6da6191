"""Reference: TransformerLens `run_with_cache` on the same model and prompt (torch CPU), vs ours.

    python -m benchmarks.reference_transformerlens [--tokens 512] [--runs 5] [--tl-python PATH]

TransformerLens is the field's usual tool for activation caching. It is an optional
dependency: when `transformer_lens` is importable here it is used; otherwise the interpreter
named by `--tl-python` or `$NSBRIDGE_TL_PYTHON` (a separate venv with torch and
transformer-lens) runs the TransformerLens half; with neither, the benchmark is skipped with a
message. TransformerLens 4.x boots the same Hugging Face folder the server runs
(`TransformerBridge.boot_transformers`, offline).

Both sides run one forward pass over the same P prompt tokens (no generation), float32, CPU:
- TransformerLens: plain forward, `run_with_cache(names_filter=resid_post)`, and
  `run_with_cache()` (every hook point it has);
- nsbridge (MLX): the engine's prefill step without hooks, with the residual stream of every
  layer, and with all ten components on every layer plus the embedding (`engine.capture`).
Each side interleaves its variants (rotating order, several runs, medians); the overhead of
each is relative to its own plain forward. The last position's logits of both are compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import machine_info, median, print_table, progress, write_result

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The history of computing is a story of abstraction layered on abstraction. Early machines were "
        "programmed by rewiring panels; later, stored programs let the same hardware run many tasks. "
        "Languages, compilers, operating systems and networks each hid the layer beneath. ")


# --- the TransformerLens half (runs in whichever interpreter has transformer_lens) -------------
def tl_worker(spec: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformer_lens
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    bridge = TransformerBridge.boot_transformers(spec["model_dir"], device="cpu", dtype=torch.float32)
    tokens = torch.tensor([spec["token_ids"]], dtype=torch.long)
    resid = lambda name: name.endswith("hook_resid_post")  # noqa: E731

    def plain():
        return bridge(tokens)

    def cache_resid():
        return bridge.run_with_cache(tokens, names_filter=resid)

    def cache_all():
        return bridge.run_with_cache(tokens)

    variants = {"plain": plain, "resid_post": cache_resid, "all": cache_all}
    counts = {}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up (first calls are several times slower)
            for _ in range(2):
                out = fn()
            if name != "plain":
                counts[name] = len(out[1])
        times = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        names = list(variants)
        for i in range(spec["runs"]):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                c0, t0 = time.process_time(), time.perf_counter()
                out = variants[name]()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                del out
        logits = bridge(tokens)[0, -1].float().tolist()
    try:
        from importlib.metadata import version

        tl_version = version("transformer-lens")
    except Exception:
        tl_version = getattr(transformer_lens, "__version__", "?")
    return {"times_s": times, "cpu_s": cpu, "hooks": counts, "logits_last": logits, "torch": torch.__version__,
            "transformer_lens": tl_version, "torch_threads": torch.get_num_threads()}


def _tl_python(explicit: str | None) -> str | None:
    if importlib.util.find_spec("transformer_lens") is not None:
        return sys.executable
    cand = explicit or os.environ.get("NSBRIDGE_TL_PYTHON")
    if cand and Path(cand).exists():
        return cand
    return None


def run_tl(python: str, spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        sin, sout = Path(d) / "in.json", Path(d) / "out.json"
        sin.write_text(json.dumps(spec))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([python, "-m", "benchmarks.reference_transformerlens", "--tl-worker", str(sin), str(sout)],
                              cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0 or not sout.exists():
            raise RuntimeError(f"the TransformerLens worker ({python}) failed with exit code {proc.returncode}")
        return json.loads(sout.read_text())


# --- the MLX half --------------------------------------------------------------------------------
def mlx_side(model_dir: str, model_id: str | None, n_tokens: int, runs: int) -> dict:
    import engine  # noqa: F401  (OpenBLAS before mlx.core)
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from engine.capture import Capture
    from engine.hooks import hook_specs, resolve_hooks
    from engine.model import load_model
    from vocabulary import COMPONENT_NAMES as COMPONENTS

    lm = load_model(model_dir, model_id)
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += lm.tokenizer.encode(TEXT, add_special_tokens=False)
    ids = ids[:n_tokens]
    n = lm.info.n_layers
    resid = [{"layer_name": f"model.layers.{i}", "component": "residual"} for i in range(n)]
    everything = [{"layer_name": "transformer.wte", "component": "embedding", "hook_id": "embed"}] + [
        {"layer_name": f"model.layers.{i}", "component": c} for c in COMPONENTS if c != "embedding" for i in range(n)]
    x = mx.array(ids)[None]

    def forward(hooks):
        cache = make_prompt_cache(lm.model)
        if not hooks:
            mx.eval(lm.model(x, cache=cache))
            return None
        capture = Capture(lm, resolve_hooks(lm, hook_specs(hooks)))
        with capture.installed(lm):
            capture.begin_step(0, 0)
            logits = lm.model(x, cache=cache)
            mx.eval(logits, *capture.end_step())
        return capture

    variants = {"plain": None, "resid_post": resid, "all": everything}
    counts = {"resid_post": len(resolve_hooks(lm, hook_specs(resid))),
              "all": len(resolve_hooks(lm, hook_specs(everything)))}
    for name, hooks in variants.items():
        for _ in range(2):
            forward(hooks)
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    names = list(variants)
    for i in range(runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            progress(f"reference: MLX run {i + 1}/{runs} {name}")
            c0, t0 = time.process_time(), time.perf_counter()
            cap = forward(variants[name])
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            del cap
    logits = lm.model(x, cache=make_prompt_cache(lm.model))[0, -1]
    mx.eval(logits)
    return {"times_s": times, "cpu_s": cpu, "hooks": counts, "logits_last": logits.tolist(), "token_ids": ids,
            "model": lm.info.to_dict()}


# --- driver ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--tl-worker":
        spec = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(tl_worker(spec)))
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="prompt tokens in the forward pass")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--tl-python", default=None, help="an interpreter with transformer_lens (or $NSBRIDGE_TL_PYTHON)")
    ap.add_argument("--model", default=None, help="Hugging Face-layout model folder (default: SmolLM2-135M)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)
    if args.quick and args.tokens == 512:
        args.tokens = 256

    python = _tl_python(args.tl_python)
    if python is None:
        msg = ("transformer_lens is not installed: skipped. Install it (`pip install transformer-lens`, with torch) "
               "in this venv, or in another one and pass --tl-python /path/to/python or set NSBRIDGE_TL_PYTHON.")
        print(f"reference_transformerlens: {msg}")
        result = {"benchmark": "reference_transformerlens", "skipped": True, "reason": msg,
                  "machine": machine_info(with_blas=False)}
        path = write_result("reference_transformerlens", result, args.out)
        print(f"wrote {path}")
        return result

    if args.model:
        model_dir, model_id = args.model, None
    else:
        from engine.default_model import MODEL_ID, ensure_default_model

        model_dir, model_id = str(ensure_default_model()), MODEL_ID
    progress(f"reference: MLX side ({args.tokens} tokens, {runs} runs)")
    ours = mlx_side(model_dir, model_id, args.tokens, runs)
    progress(f"reference: TransformerLens side in {python}")
    tl = run_tl(python, {"model_dir": model_dir, "token_ids": ours["token_ids"], "runs": runs})

    import numpy as np

    diff = float(np.max(np.abs(np.array(ours["logits_last"]) - np.array(tl["logits_last"]))))
    same_top = int(np.argmax(ours["logits_last"])) == int(np.argmax(tl["logits_last"]))
    rows = []
    what = {"plain": "plain forward", "resid_post": "cache resid_post, all layers", "all": "cache every hook point"}
    for impl, side in ((f"TransformerLens {tl['transformer_lens']} (torch {tl['torch']})", tl), ("nsbridge (MLX)", ours)):
        base = median(side["times_s"]["plain"])
        base_best, base_cpu = min(side["times_s"]["plain"]), median(side["cpu_s"]["plain"])
        for key in ("plain", "resid_post", "all"):
            t = median(side["times_s"][key])
            plain = key == "plain"
            rows.append({"impl": impl, "variant": key, "what": what[key], "hooks": side["hooks"].get(key, 0),
                         "ms": t * 1e3, "overhead_pct": None if plain else (t / base - 1) * 100,
                         "overhead_best_pct": None if plain else (min(side["times_s"][key]) / base_best - 1) * 100,
                         "overhead_cpu_pct": None if plain else (median(side["cpu_s"][key]) / base_cpu - 1) * 100,
                         "cpu_ms": median(side["cpu_s"][key]) * 1e3,
                         "samples_ms": [x * 1e3 for x in side["times_s"][key]], "headline": key == "all"})
    print(f"\nreference_transformerlens: one forward over {args.tokens} tokens, median of {runs}")
    pct = lambda v: "-" if v is None else f"{v:+.1f}%"  # noqa: E731
    print_table(["implementation", "what", "hooks", "ms", "overhead", "best-of", "cpu time"],
                [[r["impl"], r["what"], r["hooks"], r["ms"], pct(r["overhead_pct"]), pct(r["overhead_best_pct"]),
                  pct(r["overhead_cpu_pct"])] for r in rows])
    print(f"last-position logits: max |MLX - torch| = {diff:.2e}, same argmax: {same_top}")
    tl_plain = median(tl["times_s"]["plain"])
    mx_plain = median(ours["times_s"]["plain"])
    result = {
        "benchmark": "reference_transformerlens", "skipped": False, "machine": machine_info(), "runs": runs,
        "prompt_tokens": args.tokens, "model": ours["model"], "tl_python": python,
        "description": (f"One forward pass over the same {args.tokens} prompt tokens of {ours['model']['model_id']} "
                        f"(float32, CPU), each side's variants interleaved, {runs} runs; overhead vs the same "
                        "implementation's plain forward: median wall time, best-of (fastest over fastest) and median "
                        "process CPU time (the last two less sensitive to other load on the machine)."),
        "note": (f"'every hook point': TransformerLens caches {tl['hooks'].get('all')} hook points (including "
                 f"hook_in/hook_out aliases); nsbridge caches {ours['hooks']['all']} (10 components x layers + "
                 f"embedding). Plain forward: torch {tl_plain * 1e3:.0f} ms vs MLX {mx_plain * 1e3:.0f} ms "
                 f"({mx_plain / tl_plain:.2f}x). Last-position logits agree to {diff:.1e} (same argmax: {same_top})."),
        "logits_max_abs_diff": diff, "same_argmax": same_top, "torch_threads": tl.get("torch_threads"),
        "rows": rows,
    }
    path = write_result("reference_transformerlens", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
