"""Shared benchmark helpers, and the report: summary table (markdown) and plot (PNG).

    python -m benchmarks.report            # rebuild summary.md / summary.png from results/*.json

Helpers used by every script: `machine_info()`, `median`, `percentile`, `progress` (stderr),
`write_result` (benchmarks/results/<name>.json). The report reads whatever result files exist
and skips the sections whose benchmark did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
MiB = 1 << 20


# --- helpers --------------------------------------------------------------------------------
def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine_info(with_blas: bool = True) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews timings
    except OSError:
        pass
    if with_blas:
        try:
            import engine  # noqa: F401  (loads OpenBLAS before mlx.core, as the server does)
            from engine import blas

            info["blas"] = blas.BLAS_IN_USE
        except Exception as exc:  # reporting must not fail on this
            info["blas"] = f"unknown ({exc})"
        try:
            import mlx.core as mx

            info["mlx"] = mx.__version__
        except Exception:
            pass
    return info


def write_result(name: str, result: dict, out: Path | None = None) -> Path:
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result.setdefault("benchmark", name)
    result.setdefault("when", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Print (and return) a plain fixed-width table."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# --- the report -----------------------------------------------------------------------------
BENCHMARKS = ("shm_throughput", "transport_e2e", "capture_overhead", "scaling", "server_load",
              "reference_transformerlens", "interventions", "smalltalk_binary", "batching", "attribution", "harvest")


def load_results(results_dir: Path = RESULTS_DIR, only: set[str] | None = None) -> dict[str, dict]:
    out = {}
    for name in ("shm_throughput", "capture_overhead", "transport_e2e", "server_load", "scaling",
                 "reference_transformerlens", "interventions", "smalltalk_binary", "batching", "attribution",
                 "harvest"):
        if only is not None and name not in only:
            continue
        p = results_dir / f"{name}.json"
        if p.exists():
            try:
                out[name] = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
    return out


def _get(d: dict, *keys, default=None):
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        else:
            return default
    return d


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0f}%"


def section_shm(r: dict) -> str:
    rows = r.get("rows", [])
    if not rows:
        return ""
    table = md_table(
        ["case", "payload MiB", "arrays", "memcpy GB/s", "MLX->shm Arrow GB/s", "write/memcpy", "cold write GB/s",
         "consumer open us", "orjson GB/s", "JSON/shm time"],
        [[x.get("case", "-"), x.get("payload_mib"), x.get("arrays"), x.get("memcpy_gbps"), x.get("write_gbps"),
          x.get("write_vs_memcpy"), x.get("cold_write_gbps"), x.get("open_us"), x.get("json_gbps"),
          None if x.get("json_vs_shm") is None else f"{x['json_vs_shm']:.0f}x"] for x in rows])
    payload = r.get("payload", "")
    if isinstance(payload, dict):
        payload = "\n".join(f"- {k}: {v}" for k, v in payload.items())
    memcpy = f"\n\nmemcpy: {r['memcpy']}" if r.get("memcpy") else ""
    return f"### Data path: MLX -> shared memory (`shm_throughput`)\n\n{payload}{memcpy}\n\n{table}\n"


CAPTURE_COLUMNS = [("variant", "variant"), ("tokens_per_s", "tok/s"), ("prefill_tok_s", "prefill tok/s"),
                   ("decode_tok_s", "decode tok/s"), ("ratio_total", "time x engine"),
                   ("ratio_prefill", "prefill x"), ("ratio_decode", "decode x"), ("ratio_best", "best-of x"),
                   ("ratio_cpu", "cpu time x"), ("target", "target"),
                   ("captured_mib", "captured MiB"), ("same_tokens_as_engine", "same tokens")]


def section_capture(r: dict) -> str:
    rows = r.get("rows") or r.get("configs") or []
    if not isinstance(rows, list) or not rows:
        return f"### Capture overhead (`capture_overhead`)\n\n```\n{json.dumps(r, indent=1)[:3000]}\n```\n"
    cols = [(k, h) for k, h in CAPTURE_COLUMNS if k in rows[0]]
    if len(cols) < 3:  # an unknown layout: every scalar column
        cols = [(k, k) for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
    table = md_table([h for _, h in cols], [[x.get(k) for k, _ in cols] for x in rows])
    extra = r.get("description") or ""
    return f"### Capture overhead in generation (`capture_overhead`)\n\n{extra}\n\n{table}\n"


def section_transport(r: dict) -> str:
    parts = ["### End-to-end transport into a consumer process (`transport_e2e`)\n"]
    syn = r.get("synthetic", {}).get("rows", [])
    if syn:
        parts.append(r["synthetic"].get("description", "") + "\n")
        parts.append(md_table(
            ["payload MiB", "memcpy ms", "shm handle+open ms", "shm +read all ms", "Arrow/HTTP ms", "inline JSON ms",
             "shm/memcpy", "Arrow-HTTP/shm", "JSON/shm", "JSON GB/s"],
            [[x["payload_mib"], x["memcpy_ms"], x["shm_ms"], x.get("shm_read_ms"), x["arrow_http_ms"],
              x.get("inline_json_ms"),
              x["shm_ms"] / x["memcpy_ms"], x["arrow_http_ms"] / x["shm_ms"],
              None if x.get("inline_json_ms") is None else x["inline_json_ms"] / x["shm_ms"],
              x.get("inline_json_gbps")] for x in syn]) + "\n")
    real = r.get("default_model", {}).get("rows", [])
    if real:
        parts.append(r["default_model"].get("description", "") + "\n")
        parts.append(md_table(
            ["payload MiB", "prompt tok", "hooks", "plain chat ms", "shm ms", "Arrow/HTTP ms", "inline JSON ms",
             "JSON - plain ms", "shm - plain ms"],
            [[x["payload_mib"], x["prompt_tokens"], x["hooks"], x["plain_ms"], x["shm_ms"], x["arrow_http_ms"],
              x["inline_json_ms"], x["inline_json_ms"] - x["plain_ms"], x["shm_ms"] - x["plain_ms"]]
             for x in real]) + "\n")
    return "\n".join(parts) if len(parts) > 1 else ""


def section_server(r: dict) -> str:
    parts = ["### Server under concurrent load (`server_load`)\n"]
    for block in r.get("models", []):
        parts.append(f"Model: **{block['model']}** ({block.get('model_note', '')}); {block.get('description', '')}\n")
        parts.append(md_table(
            ["scenario", "clients", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "MiB/request"],
            [[x["scenario"], x["clients"], x["requests"], x["req_per_s"], x["p50_ms"], x["p95_ms"], x["p99_ms"],
              x["errors"], x.get("payload_mib")] for x in block["rows"]]) + "\n")
    return "\n".join(parts) if len(parts) > 1 else ""


def section_scaling(r: dict) -> str:
    parts = ["### How capture cost scales (`scaling`)\n", r.get("description", "") + "\n"]
    for sweep in r.get("sweeps", []):
        parts.append(f"**{sweep['name']}**\n")
        parts.append(md_table(
            ["prompt tok", "layers", "hooks", "capture MiB", "no hooks ms", "capture ms", "overhead", "best-of",
             "cpu time", "shm write ms"],
            [[x["prompt_tokens"], x["layers"], x["hooks"], x["capture_mib"], x["base_ms"], x["capture_ms"],
              _pct(x["overhead_pct"]), _pct(x.get("overhead_best_pct")), _pct(x.get("overhead_cpu_pct")),
              x.get("shm_write_ms")] for x in sweep["rows"]]) + "\n")
    return "\n".join(parts) if len(parts) > 2 else ""


def section_reference(r: dict) -> str:
    head = "### Reference: TransformerLens `run_with_cache` (`reference_transformerlens`)\n"
    if r.get("skipped"):
        return f"{head}\nSkipped: {r.get('reason', '')}\n"
    rows = r.get("rows", [])
    table = md_table(["implementation", "what", "hooks cached", "forward ms", "vs its plain forward", "best-of",
                      "cpu time"],
                     [[x["impl"], x["what"], x.get("hooks"), x["ms"], _pct(x.get("overhead_pct")),
                       _pct(x.get("overhead_best_pct")), _pct(x.get("overhead_cpu_pct"))] for x in rows])
    return f"{head}\n{r.get('description', '')}\n\n{table}\n\n{r.get('note', '')}\n"


def section_harvest(r: dict) -> str:
    head = "### Harvesting activations into Parquet (`harvest`)\n"
    table = md_table(["variant", "s", "tok/s", "best tok/s", "x plain forward", "x forward (best)",
                      "x forward (cpu time)", "GB written", "GB/s"],
                     [[x["variant"], x["seconds"], x["tokens_per_s"], x.get("best_tokens_per_s"), x["x_forward"],
                       x.get("x_forward_best"), x.get("x_forward_cpu"), x.get("gb_written"), x.get("gb_per_s")]
                      for x in r.get("rows", [])])
    met = "met" if r.get("target_met") else "NOT met"
    return f"{head}\n{r.get('description', '')} Target: harvest >= {r.get('target')}x: {met}.\n\n{table}\n"


def section_attribution(r: dict) -> str:
    head = "### Attribution patching against the exhaustive patching sweep (`attribution`)\n"
    table = md_table(["method", "s", "sweep s / method s", "correlation (all rows)", "correlation (changed positions)",
                      "correlation (attention + MLP)", "top-20 overlap", "top-20 overlap (attention + MLP)",
                      "top-20 overlap (GradDrop)"],
                     [[x["method"], x["seconds"], x["sweep_over_method"], x["correlation_all"],
                       x["correlation_changed"], x.get("correlation_attention_mlp", "-"), x["top20_overlap"],
                       x.get("top20_overlap_attention_mlp", "-"), x.get("top20_overlap_graddrop", "-")]
                      for x in r.get("rows", [])])
    biggest = md_table(["site", "position", "patched", "atp", "atp*", "GradDrop"],
                       [[x["site"], x["position"], x["patched"], x["atp"], x["atp_star"], x["graddrop"]]
                        for x in r.get("largest_patches", [])])
    return (f"{head}\n{r.get('description', '')} Sweep: {r.get('sweep_s')} s.\n\n{table}\n\n"
            f"The largest real patches:\n\n{biggest}\n")


def section_interventions(r: dict) -> str:
    head = "### Interventions: steering, head ablation, activation patching (`interventions`)\n"
    parts = [head, r.get("description", "") + "\n"]
    st = r.get("steering")
    if st:
        parts.append(f"**Steering**: `add` of a random unit vector x {st['coefficient']:g} at `{st['site']}`, every "
                     f"position (residual norm there ~{st.get('residual_norm_median', 0):.0f}); prompt "
                     f"{st['prompt_tokens']} + {st['decode_tokens']} decoded tokens. Target <= {st['target']}x: "
                     f"{'met' if st['target_met'] else 'NOT met'}. Steered text differs from plain: "
                     f"{st['text_differs']}; positions touched as expected: {st['positions_touched_ok']}.\n")
        parts.append(md_table(["variant", "total s", "tok/s", "x plain", "prefill x", "decode x", "best-of x",
                               "cpu time x", "decode step ms", "step x", "target"],
                              [[x["variant"], x["total_s"], x["tokens_per_s"], x["ratio_total"], x["ratio_prefill"],
                                x["ratio_decode"], x["ratio_best"], x["ratio_cpu"], x.get("step_ms_median"),
                                x.get("ratio_step_median"), x["target"]] for x in st["rows"]]) + "\n")
        parts.append("decode step ms: the median of every decode step of every round, pooled (less sensitive to "
                     "bursts of other load than whole generations).\n")
    ab = r.get("ablation")
    if ab:
        parts.append(f"**Head-ablation sweep**: head {ab['head']} of `{ab['site']}` zeroed, one run per layer "
                     f"({ab['layers']}), beside a plain run each; prompt {ab['prompt_tokens']} + "
                     f"{ab['decode_tokens']} decoded tokens. Ablations that changed the generated tokens: "
                     f"{ab['ablations_changing_output']}/{ab['layers']}, their log-probabilities: "
                     f"{ab.get('ablations_changing_logprobs', '-')}/{ab['layers']}.\n")
        parts.append(md_table(["sweep", "runs", "total s", "ms per run", "x plain", "cpu time x"],
                              [["plain", ab["layers"], ab["plain_total_s"], ab["plain_ms_per_run"], 1.0, 1.0],
                               ["head ablated", ab["layers"], ab["ablated_total_s"], ab["ablated_ms_per_run"],
                                ab["ratio"], ab["ratio_cpu"]]]) + "\n")
    pa = r.get("patching")
    if pa:
        rows = [["nsbridge (MLX)", "clean capture + 30 patched runs", pa["mlx"]["patch"]["sweep_s"],
                 pa["mlx"]["patch"]["clean_ms"], pa["mlx"]["patch"]["run_ms"], pa["mlx"]["patch"]["cpu_s"]],
                ["nsbridge (MLX)", "31 plain runs", pa["mlx"]["plain"]["sweep_s"], pa["mlx"]["plain"]["clean_ms"],
                 pa["mlx"]["plain"]["run_ms"], pa["mlx"]["plain"]["cpu_s"]]]
        tl = pa.get("transformerlens")
        if tl:
            label = f"TransformerLens {tl.get('transformer_lens')} (torch {tl.get('torch')}, {tl.get('torch_threads')} threads)"
            rows += [[label, "run_with_cache + 30 run_with_hooks", tl["patch"]["sweep_s"], tl["patch"]["clean_ms"],
                      tl["patch"]["run_ms"], tl["patch"]["cpu_s"]],
                     [label, "31 plain forwards", tl["plain"]["sweep_s"], tl["plain"]["clean_ms"],
                      tl["plain"]["run_ms"], tl["plain"]["cpu_s"]]]
        parts.append(f"**Activation-patching sweep** (`{pa['sites']}`, every prompt position, {pa['prompt_tokens']} "
                     f"tokens, max_tokens 1): \"{pa['prompts']['clean']}\" patched into \"{pa['prompts']['corrupted']}\"; "
                     f"positions touched per patch {pa['positions_touched']} (as expected: {pa['positions_touched_ok']}); "
                     f"logit difference clean {pa['clean_logit_diff']:.2f}, corrupted {pa['corrupted_logit_diff']:.2f}.\n")
        parts.append(md_table(["implementation", "what", "sweep s", "clean ms", "ms per run", "cpu s"], rows) + "\n")
        if tl:
            parts.append(f"MLX sweep / TransformerLens sweep: {pa['ratio_vs_transformerlens']:.2f}x (best-of "
                         f"{pa['ratio_vs_transformerlens_best']:.2f}x, cpu {pa['ratio_vs_transformerlens_cpu']:.2f}x); "
                         f"the two implementations' logit differences agree to {tl['logit_diff_max_abs_diff']:.1e}.\n")
        else:
            parts.append(f"TransformerLens: skipped: {pa.get('transformerlens_reason', '')}\n")
        if pa.get("note"):
            parts.append(pa["note"] + "\n")
    return "\n".join(parts) if len(parts) > 2 else ""


def section_batching(r: dict) -> str:
    rows = r.get("rows", [])
    if not rows:
        return ""
    t = r.get("targets", {})
    met = r.get("targets_met", {})
    table = md_table(["clients", "mlx_lm.server tok/s", "nsbridge off tok/s", "off / mlx_lm", "nsbridge capture tok/s",
                      "capture / off", "errors"],
                     [[x["clients"], x.get("mlx_lm_tok_s"), x.get("off_tok_s"), x.get("off_vs_mlx_lm"),
                       x.get("capture_tok_s"), x.get("capture_vs_off"), x.get("errors")] for x in rows])
    goals = (f"Targets: off >= {t.get('off_vs_mlx_lm', 1.0):g}x mlx_lm.server at every concurrency "
             f"({'met' if met.get('off_vs_mlx_lm') else 'NOT met'}); capture >= {t.get('capture_vs_off', 0.9):g}x off "
             f"({'met' if met.get('capture_vs_off') else 'NOT met'}).")
    plot = "\n![batching](results/batching.png)\n" if (RESULTS_DIR / "batching.png").exists() else ""
    return (f"### Concurrent clients: tokens/s against mlx_lm.server (`batching`)\n\n{r.get('description', '')}\n\n"
            f"{table}\n\n{goals}\n{plot}")


def section_smalltalk(r: dict) -> str:
    head = "### NeuroScope's Smalltalk client: binary vs JSON activations (`smalltalk_binary`)\n"
    if r.get("skipped"):
        return f"{head}\nskipped: {r['skipped']}\n"
    met = "met" if r.get("target_met") else "NOT met"
    return (f"{head}\n{r.get('description', '')}\n\n{md_table(r['headers'], r['rows'])}\n\n"
            f"Target: Smalltalk (base64) within {r.get('target', 3):g}x of Python for the 30-layer requests: {met}.\n")


def summary_markdown(results: dict[str, dict], machine: dict, headline: list[list[Any]] | None = None) -> str:
    m = machine
    lines = ["## Latest results", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM; BLAS: {m.get('blas')}; "
             f"{m.get('platform')}; Python {m.get('python')}, mlx {m.get('mlx', '?')}; run {m.get('date')}"
             + (f"; mode: {m['mode']}" if m.get("mode") else "")
             + (f"; load average {m['loadavg']} at the start" if m.get("loadavg") else "")
             + (f", {m['loadavg_end']} at the end" if m.get("loadavg_end") else ""), ""]
    busy = max([*(m.get("loadavg") or [0])[:1], *(m.get("loadavg_end") or [0])[:1]])
    if m.get("cores") and busy > 0.5 * m["cores"]:
        lines += [f"> **The machine was busy** (load average up to {busy:.1f} on {m['cores']} cores, from other "
                  "work): wall times are inflated and noisy, and small ratios are within noise. Prefer the "
                  "best-of and CPU-time columns, and rerun on an idle machine for numbers to quote.", ""]
    if headline:
        lines += ["### Headline", "", md_table(["measure", "value", "context"], headline), ""]
    for name, fn in (("shm_throughput", section_shm), ("transport_e2e", section_transport),
                     ("capture_overhead", section_capture), ("scaling", section_scaling),
                     ("server_load", section_server), ("reference_transformerlens", section_reference),
                     ("interventions", section_interventions), ("smalltalk_binary", section_smalltalk),
                     ("batching", section_batching), ("attribution", section_attribution),
                     ("harvest", section_harvest)):
        if name in results:
            try:
                text = fn(results[name])
            except Exception as exc:  # a changed result layout must not break the whole report
                text = f"### {name}\n\n(could not format: {type(exc).__name__}: {exc})\n"
            if text:
                lines += [text, ""]
    return "\n".join(lines)


def headline_rows(results: dict[str, dict]) -> list[list[Any]]:
    out: list[list[Any]] = []
    shm = [x for x in results.get("shm_throughput", {}).get("rows", []) if x.get("case", "prefill") == "prefill"]
    if shm:
        big = max(shm, key=lambda x: x["payload_mib"])
        out.append(["MLX -> shm Arrow write vs memcpy", f"{big['write_vs_memcpy']:.2f}x",
                    f"{big['payload_mib']:.0f} MiB, {big['write_gbps']:.1f} vs {big['memcpy_gbps']:.1f} GB/s"])
    for x in results.get("shm_throughput", {}).get("rows", []):
        if x.get("case") == "decode":
            out.append(["MLX -> shm Arrow write vs memcpy, decode case", f"{x['write_vs_memcpy']:.2f}x",
                        f"{x['arrays']} arrays (30 hooks x 129 steps), target >= 0.8x"])
    syn = results.get("transport_e2e", {}).get("synthetic", {}).get("rows", [])
    if syn:
        big = [x for x in syn if x.get("inline_json_ms")]
        if big:
            b = max(big, key=lambda x: x["payload_mib"])
            out.append(["inline JSON / shm, end to end", f"{b['inline_json_ms'] / b['shm_ms']:.0f}x",
                        f"{b['payload_mib']:.0f} MiB: {b['inline_json_ms']:.0f} ms vs {b['shm_ms']:.1f} ms "
                        f"(memcpy {b['memcpy_ms']:.1f} ms)"])
    for x in results.get("capture_overhead", {}).get("rows", []):
        if x.get("variant") in ("mlx_lm", "residual", "all_ten") and x.get("ratio_total") is not None:
            what = {"mlx_lm": "plain mlx_lm generation vs our engine, no hooks",
                    "residual": "generation time, residual capture on all layers",
                    "all_ten": "generation time, all ten components on all layers"}[x["variant"]]
            ctx = f"{x.get('tokens_per_s')} tok/s"
            if x.get("target"):
                ctx += f", target <= {x['target']}x"
            out.append([what, f"{x['ratio_total']:.2f}x", ctx])
    sc = results.get("scaling", {}).get("sweeps", [])
    for sweep in sc:
        if sweep["rows"]:
            last = sweep["rows"][-1]
            out.append([f"capture overhead, {sweep['name']}", _pct(last["overhead_pct"]),
                        f"{last['hooks']} hooks, {last['prompt_tokens']} prompt tokens, {last['capture_mib']:.0f} MiB"])
    ref = results.get("reference_transformerlens", {})
    for x in ref.get("rows", []):
        if x.get("headline"):
            out.append([f"{x['impl']}: {x['what']}", _pct(x.get("overhead_pct")), f"{x['ms']:.0f} ms"])
    iv = results.get("interventions", {})
    st, ab, pa = iv.get("steering"), iv.get("ablation"), iv.get("patching")
    if st:
        step = f", median decode step {st['ratio_step_median']:.2f}x" if st.get("ratio_step_median") else ""
        out.append(["generation time, one steering vector (add, all positions)", f"{st['ratio']:.2f}x",
                    f"{st['prompt_tokens']} + {st['decode_tokens']} tokens{step}, target <= {st['target']}x "
                    f"({'met' if st['target_met'] else 'not met'})"])
    if ab:
        out.append(["head-ablation sweep vs plain runs", f"{ab['ratio']:.2f}x",
                    f"{ab['layers']} runs, {ab['ablated_ms_per_run']:.0f} vs {ab['plain_ms_per_run']:.0f} ms per run"])
    if pa:
        ctx = f"clean capture + {pa['layers']} patched runs, {pa['prompt_tokens']} tokens"
        if pa.get("ratio_vs_transformerlens") is not None:
            ctx += (f"; TransformerLens {pa['transformerlens']['patch']['sweep_s']:.1f} s "
                    f"({pa['ratio_vs_transformerlens']:.2f}x)")
        out.append(["activation-patching sweep (resid_pre, all layers)", f"{pa['mlx']['patch']['sweep_s']:.1f} s", ctx])
    for x in results.get("batching", {}).get("rows", [])[-1:]:  # the most clients
        if x.get("off_vs_mlx_lm") is not None:
            out.append([f"tokens/s vs mlx_lm.server, {x['clients']} concurrent clients", f"{x['off_vs_mlx_lm']:.2f}x",
                        f"{x['off_tok_s']:.1f} vs {x['mlx_lm_tok_s']:.1f} tok/s; residual capture on all layers "
                        + (f"{x['capture_vs_off']:.2f}x of capture off" if x.get("capture_vs_off") else "not run")])
    hv = results.get("harvest", {})
    for x in hv.get("rows", []):
        if x.get("variant") == "harvest":
            out.append(["harvest (Parquet, all-layer residual) vs the plain batched forward",
                        f"{x['x_forward_best']:.2f}x", f"best rounds, {x['best_tokens_per_s']:.0f} tok/s, "
                        f"{hv['tokens']} tokens, target >= {hv['target']}x"])
    for x in results.get("attribution", {}).get("rows", []):
        out.append([f"attribution patching ({x['method']}) vs the exhaustive patching sweep",
                    f"{x['sweep_over_method']:.0f}x faster",
                    f"{x['seconds']:.2f} s vs {results['attribution']['sweep_s']:.0f} s, "
                    f"{results['attribution']['rows_total']} rows; correlation {x['correlation_changed']:.2f}, "
                    f"top-20 overlap {x['top20_overlap']}"])
    for block in results.get("server_load", {}).get("models", []):
        for x in block["rows"]:
            if x["scenario"] == "chat":
                out.append([f"server req/s, short chat ({block['model']}, {x['clients']} clients)",
                            f"{x['req_per_s']:.1f}", f"p50 {x['p50_ms']:.0f} ms, p99 {x['p99_ms']:.0f} ms"])
    return out


# --- the plot --------------------------------------------------------------------------------
def plot(results: dict[str, dict], path: Path, machine: dict | None = None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None

    panels = []
    if results.get("transport_e2e", {}).get("synthetic", {}).get("rows"):
        panels.append(_plot_transport)
    if results.get("shm_throughput", {}).get("rows"):
        panels.append(_plot_shm)
    if results.get("scaling", {}).get("sweeps"):
        panels.append(_plot_scaling)
    if results.get("capture_overhead"):
        panels.append(_plot_capture)
    if results.get("server_load", {}).get("models"):
        panels.append(_plot_server)
    if results.get("batching", {}).get("rows"):
        panels.append(_plot_batching)
    if results.get("reference_transformerlens", {}).get("rows"):
        panels.append(_plot_reference)
    if results.get("interventions", {}).get("patching", {}).get("mlx"):
        panels.append(_plot_interventions)
    if not panels:
        return None
    ncols = 3 if len(panels) > 4 else 2
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.4 * nrows), squeeze=False)
    for ax, fn in zip(axes.flat, panels):
        try:
            fn(ax, results)
        except Exception as exc:
            ax.text(0.5, 0.5, f"{fn.__name__}: {exc}", ha="center", va="center", wrap=True, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if machine:
        fig.suptitle(f"nsbridge benchmarks: {machine.get('cpu')}, {machine.get('cores')} cores, "
                     f"BLAS {str(machine.get('blas', '')).split(' (')[0]}, load {machine.get('loadavg', '?')}, "
                     f"{machine.get('date', '')[:16]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_transport(ax, results):
    rows = results["transport_e2e"]["synthetic"]["rows"]
    x = [r["payload_mib"] for r in rows]
    for key, label, style in (("memcpy_ms", "memcpy (limit)", "k--"), ("shm_ms", "shm handle + open", "o-"),
                              ("arrow_http_ms", "Arrow over HTTP", "s-"), ("inline_json_ms", "inline JSON over HTTP", "^-")):
        pts = [(a, r[key]) for a, r in zip(x, rows) if r.get(key)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("activations delivered (MiB)")
    ax.set_ylabel("end-to-end ms (median)")
    ax.set_title("Getting N MiB into a consumer process")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_shm(ax, results):
    allrows = results["shm_throughput"]["rows"]
    rows = [r for r in allrows if r.get("case", "prefill") == "prefill"]
    x = [r["payload_mib"] for r in rows]
    ax.plot(x, [r["memcpy_gbps"] for r in rows], "k--", label="memcpy")
    ax.plot(x, [r["write_gbps"] for r in rows], "o-", label="MLX -> shm Arrow (pooled)")
    ax.plot(x, [r["cold_write_gbps"] for r in rows], "v:", label="first write, fresh segment")
    js = [(a, r["json_gbps"]) for a, r in zip(x, rows) if r.get("json_gbps")]
    if js:
        ax.plot([p[0] for p in js], [p[1] for p in js], "^-", label="orjson encode")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("payload (MiB)")
    ax.set_ylabel("GB/s (median)")
    for r in allrows:
        if r.get("case", "prefill") != "prefill":
            ax.plot([r["payload_mib"]], [r["write_gbps"]], "D", color="tab:purple",
                    label=f"MLX -> shm, {r['case']} ({r.get('arrays', '?')} arrays)")
    ax.set_title("Copy paths out of MLX")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_scaling(ax, results):
    sweeps = results["scaling"]["sweeps"]
    for sweep in sweeps:
        rows = sweep["rows"]
        xs = [r["capture_mib"] for r in rows]
        ax.plot(xs, [r["overhead_pct"] for r in rows], "o-", label=sweep["name"])
        for r in rows:
            ax.annotate(str(r[sweep["vary"]]), (r["capture_mib"], r["overhead_pct"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("capture size (MiB); labels: the swept value")
    ax.set_ylabel("generation time overhead (%)")
    ax.set_title("Capture cost vs tokens / layers / hooks")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _plot_capture(ax, results):
    import numpy as np

    r = results["capture_overhead"]
    rows = r.get("rows") or []
    labels = [str(x.get("variant") or x.get("config") or x.get("name") or "?") for x in rows]
    keys = [k for k in ("ratio_prefill", "ratio_decode", "ratio_total") if rows and k in rows[0]]
    idx = np.arange(len(rows))
    w = 0.8 / max(len(keys), 1)
    for j, k in enumerate(keys):
        ax.bar(idx + (j - (len(keys) - 1) / 2) * w, [x.get(k) or 0 for x in rows], w, label=k.replace("ratio_", ""))
    for i, x in enumerate(rows):
        if x.get("target"):
            ax.plot([i - 0.4, i + 0.4], [x["target"]] * 2, "r--", lw=1)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(idx)
    ax.set_xticklabels(labels)
    ax.set_ylabel("wall time / engine without hooks")
    ax.set_title(f"Generation cost of capture (prefill {r.get('prompt_tokens', '?')} + decode "
                 f"{r.get('decode_tokens', '?')}; red: target)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_server(ax, results):
    blocks = results["server_load"]["models"]
    labels, p50, p95, p99 = [], [], [], []
    for b in blocks:
        for x in b["rows"]:
            labels.append(f"{b['model']}\n{x['scenario']} c={x['clients']}\n{x['req_per_s']:.1f} req/s")
            p50.append(x["p50_ms"])
            p95.append(x["p95_ms"])
            p99.append(x["p99_ms"])
    import numpy as np

    idx = np.arange(len(labels))
    w = 0.27
    ax.bar(idx - w, p50, w, label="p50")
    ax.bar(idx, p95, w, label="p95")
    ax.bar(idx + w, p99, w, label="p99")
    ax.set_xticks(idx)
    ax.set_xticklabels(labels, fontsize=6.5)
    ax.set_yscale("log")
    ax.set_ylabel("latency ms")
    ax.set_title("Server latency under concurrent clients")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_batching(ax, results):
    rows = results["batching"]["rows"]
    x = [r["clients"] for r in rows]
    for key, label, style in (("mlx_lm_tok_s", "mlx_lm.server", "k--o"), ("off_tok_s", "nsbridge, capture off", "o-"),
                              ("capture_tok_s", "nsbridge, residual capture", "s-")):
        pts = [(c, r[key]) for c, r in zip(x, rows) if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(c) for c in x])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("completion tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput under concurrent clients")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _plot_reference(ax, results):
    rows = results["reference_transformerlens"]["rows"]
    labels = [f"{x['impl']}\n{x['what']}" for x in rows]
    ax.barh(labels, [x["ms"] for x in rows], color=["tab:orange" if "Lens" in x["impl"] else "tab:blue" for x in rows])
    for i, x in enumerate(rows):
        if x.get("overhead_pct") is not None:
            ax.text(x["ms"], i, f" {x['overhead_pct']:+.0f}%", va="center", fontsize=8)
    ax.set_xlabel("one forward, ms (median)")
    ax.set_title(f"Full-forward capture: TransformerLens vs nsbridge ({results['reference_transformerlens'].get('prompt_tokens', '?')} tok)")
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)


def _plot_interventions(ax, results):
    pa = results["interventions"]["patching"]
    series = [("nsbridge (MLX): patched", pa["mlx"]["patch"], "o-"), ("nsbridge (MLX): plain", pa["mlx"]["plain"], "k--")]
    tl = pa.get("transformerlens")
    if tl:
        series += [("TransformerLens: patched", tl["patch"], "s-"), ("TransformerLens: plain", tl["plain"], "k:")]
    for label, s, style in series:
        ys = s.get("run_ms_by_layer")
        if ys:
            ax.plot(range(len(ys)), ys, style, label=f"{label} (sweep {s['sweep_s']:.1f} s)", markersize=3)
    ax.set_xlabel("patched layer (hook_resid_pre, every prompt position)")
    ax.set_ylabel("ms per corrupted run (median)")
    ax.set_title(f"Activation-patching sweep, {pa.get('prompt_tokens', '?')} tokens", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


# --- README ----------------------------------------------------------------------------------
START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(markdown: str, png_name: str | None, readme: Path = README) -> None:
    """Replace the README's results block with the latest table (and plot link)."""
    if not readme.exists():
        return
    text = readme.read_text()
    if START not in text or END not in text:
        return
    body = markdown.replace("## Latest results", "").strip()
    img = f"\n\n![latest benchmark plot](results/{png_name})\n" if png_name else ""
    block = f"{START}\n{body}{img}\n{END}"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    readme.write_text(before + block + after)


def build(results_dir: Path = RESULTS_DIR, machine: dict | None = None, readme: bool = True,
          only: set[str] | None = None, runs: list[dict] | None = None, results: dict[str, dict] | None = None) -> dict:
    """Write summary.md, summary.png and summary.json from `results` or the result files (`only`: these)."""
    if results is None:
        results = load_results(results_dir, only)
    machine = machine or machine_info()
    headline = headline_rows(results)
    md = summary_markdown(results, machine, headline)
    if runs:
        md += "\n### Runs\n\n" + md_table(
            ["benchmark", "status", "seconds", "command"],
            [[r["name"], r["status"], r.get("seconds"), f"`{r.get('command', '')}`"] for r in runs]) + "\n"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "summary.md").write_text(md + "\n")
    png = plot(results, results_dir / "summary.png", machine)
    summary = {"machine": machine, "headline": headline, "runs": runs or [], "results": results,
               "plot": str(png.relative_to(results_dir.parent)) if png else None}
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    if readme:
        update_readme(md, png.name if png else None)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Rebuild summary.md / summary.png / summary.json from results/*.json")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = ap.parse_args(argv)
    machine, runs = None, None
    prev = args.results / "summary.json"
    if prev.exists():  # keep the machine line and run list of the run that produced the results
        try:
            old = json.loads(prev.read_text())
            machine, runs = old.get("machine"), old.get("runs")
        except json.JSONDecodeError:
            pass
    build(args.results, machine, readme=not args.no_readme, runs=runs)
    print((args.results / "summary.md").read_text())


if __name__ == "__main__":
    main()
