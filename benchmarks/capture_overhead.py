"""What activation capture costs during generation, on the default model.

    python -m benchmarks.capture_overhead [--prompt 512] [--decode 64] [--runs 3]

Prefill a prompt of exactly --prompt tokens, then decode --decode tokens greedily, with:
  mlx_lm       plain `mlx_lm.stream_generate` (mlx-lm's own loop, for reference)
  engine       our generation loop, no hooks (the baseline of the ratios)
  residual     + `residual` on every layer
  all_ten      + all ten components on every layer (embedding once)
The variants run interleaved (the order rotates each round) after one warm-up round; each
number is the median over --runs rounds (also reported: best-of-runs and CPU-time ratios,
which suffer less from other load on a shared machine). Captured arrays stay MLX arrays (evaluated with each
step, as the server does before copying them out); the copy to shared memory is measured by
`shm_throughput`. Prints a table and writes benchmarks/results/capture_overhead.json.
"""

from __future__ import annotations

import argparse
import gc
import time

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx_lm
from mlx_lm.sample_utils import make_sampler

from benchmarks.report import machine_info, median, print_table, progress, write_result
from engine.default_model import MODEL_ID, ensure_default_model
from engine.generate import generate
from engine.model import load_model
from engine.params import SamplingParams
from engine.plan import plan
from vocabulary import COMPONENT_NAMES as COMPONENTS

VARIANTS = ("mlx_lm", "engine", "residual", "all_ten")
TARGETS = {"residual": 1.05, "all_ten": 1.5}
FILLER = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. Ships passed "
    "through the narrow strait at night, and the sailors trusted the beam to guide them past the rocks. "
    "One winter a storm broke the great lens, and the keeper spent weeks grinding new glass by hand, "
    "while the villagers brought him bread, lamp oil and news from the harbour. "
)


def build_prompt(lm, n_tokens: int) -> list[int]:
    """A chat prompt of exactly n_tokens: an instruction, then as much story as fits."""
    tok = lm.tokenizer
    head = lm.chat_prompt([{"role": "user", "content": "Continue this story in detail, at length:\n\n@@"}])
    text = tok.decode(head)
    split = text.index("@@")
    prefix = tok.encode(text[:split], add_special_tokens=False)
    suffix = tok.encode(text[split + 2:], add_special_tokens=False)
    body = tok.encode(FILLER * (n_tokens // 40 + 2), add_special_tokens=False)
    room = n_tokens - len(prefix) - len(suffix)
    if room <= 0:
        raise SystemExit(f"--prompt {n_tokens} is too short for the chat template")
    ids = prefix + body[:room] + suffix
    assert len(ids) == n_tokens
    return ids


def hook_specs(lm, variant: str) -> list[dict] | None:
    n = lm.info.n_layers
    if variant == "residual":
        return [{"layer_name": f"model.layers.{i}", "component": "residual"} for i in range(n)]
    if variant == "all_ten":
        specs = [{"layer_name": "hook_embed"}]
        specs += [{"layer_name": f"model.layers.{i}", "component": c}
                  for i in range(n) for c in COMPONENTS if c != "embedding"]
        return specs
    return None


def run_once(lm, variant: str, prompt: list[int], n_decode: int) -> dict:
    """One generation; wall times of the prefill (to the first token) and of everything."""
    gc.collect()  # MLX's buffer cache is kept, as in a running server
    tokens: list[int] = []
    c0, t0 = time.process_time(), time.perf_counter()
    first = None
    if variant == "mlx_lm":
        for r in mlx_lm.stream_generate(lm.model, lm.tokenizer, prompt, max_tokens=n_decode,
                                        sampler=make_sampler(temp=0.0)):
            first = first or time.perf_counter()
            tokens.append(r.token)
        captured = 0
    else:
        specs = hook_specs(lm, variant)
        capture = None
        for ev in generate(plan(lm, prompt=prompt, sampling=SamplingParams(max_tokens=n_decode, temperature=0.0),
                                hooks=specs)):
            first = first or time.perf_counter()
            tokens.append(ev.token)
            capture = ev.capture
        captured = sum(s.array.nbytes for r in capture.records for s in r.steps) if capture else 0
        del capture, ev
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": tokens, "total_s": total, "cpu_s": cpu, "prefill_s": first - t0, "decode_s": total - (first - t0),
            "captured_bytes": captured}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=64, help="generated tokens")
    ap.add_argument("--runs", type=int, default=3, help="measured rounds (medians)")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    args = ap.parse_args(argv)

    path = args.model or str(ensure_default_model())
    lm = load_model(path, None if args.model else MODEL_ID)
    prompt = build_prompt(lm, args.prompt)
    progress(f"{lm.info.model_id}: prompt {len(prompt)} tokens, decode {args.decode}, {args.runs} rounds")

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rnd in range(args.runs + 1):  # round 0 warms up
        order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[:rnd % len(VARIANTS)]
        for v in order:
            r = run_once(lm, v, prompt, args.decode)
            progress(f"round {rnd}{' (warm-up)' if rnd == 0 else ''} {v:9s} {r['total_s']:.2f}s "
                     f"(prefill {r['prefill_s']:.2f}s, {len(r['tokens'])} tokens)")
            if rnd:
                results[v].append(r)

    ref_tokens = results["engine"][0]["tokens"]
    rows = []
    base = {k: median([r[k] for r in results["engine"]]) for k in ("total_s", "prefill_s", "decode_s", "cpu_s")}
    base_min = min(r["total_s"] for r in results["engine"])
    for v in VARIANTS:
        rs = results[v]
        n_gen = len(rs[0]["tokens"])
        total, prefill, decode = (median([r[k] for r in rs]) for k in ("total_s", "prefill_s", "decode_s"))
        rows.append({
            "variant": v,
            "tokens_generated": n_gen,
            "same_tokens_as_engine": all(r["tokens"] == ref_tokens for r in rs),
            "total_s": round(total, 3),
            "tokens_per_s": round((len(prompt) + n_gen) / total, 1),
            "prefill_tok_s": round(len(prompt) / prefill, 1),
            "decode_tok_s": round((n_gen - 1) / decode, 2) if n_gen > 1 else None,
            "ratio_total": round(total / base["total_s"], 3),
            "ratio_prefill": round(prefill / base["prefill_s"], 3),
            "ratio_decode": round(decode / base["decode_s"], 3),
            "ratio_best": round(min(r["total_s"] for r in rs) / base_min, 3),
            "ratio_cpu": round(median([r["cpu_s"] for r in rs]) / base["cpu_s"], 3),
            "target": TARGETS.get(v),
            "captured_mib": round(rs[0]["captured_bytes"] / 2**20, 1),
            "runs_total_s": [round(r["total_s"], 3) for r in rs],
        })
    print_table(["variant", "tokens", "total s", "tok/s", "prefill tok/s", "decode tok/s", "x engine",
                 "x prefill", "x decode", "x best", "x cpu", "target", "captured MiB"],
                [[r["variant"], r["tokens_generated"], r["total_s"], r["tokens_per_s"], r["prefill_tok_s"],
                  r["decode_tok_s"], r["ratio_total"], r["ratio_prefill"], r["ratio_decode"], r["ratio_best"], r["ratio_cpu"], r["target"],
                  r["captured_mib"]] for r in rows])
    result = {
        "description": (
            f"{lm.info.model_id}, prefill {len(prompt)} tokens + decode {args.decode} (greedy), medians of "
            f"{args.runs} interleaved rounds after a warm-up. tok/s = (prompt + generated) / total wall time; "
            "ratios are median wall time over our engine without hooks (x best: fastest run over fastest run; "
            "x cpu: median process CPU time, less sensitive to other load on the machine). Targets: residual <= 1.05x, all ten <= 1.5x."
        ),
        "model": lm.info.to_dict(),
        "prompt_tokens": len(prompt),
        "decode_tokens": args.decode,
        "runs": args.runs,
        "rows": rows,
        "machine": machine_info(),
    }
    out = write_result("capture_overhead", result)
    progress(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
