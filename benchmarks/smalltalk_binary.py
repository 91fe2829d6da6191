"""NeuroScope's Smalltalk client at full speed: binary activations vs inline JSON, beside Python.

    python -m benchmarks.smalltalk_binary [--quick] [--runs N] [--url URL]

The default model (SmolLM2-135M, 30 layers) behind a real server; hooks from
`createCircuitAnalysisHooks:` (residual, attention and MLP of the first 4 or all 30 layers); a
prompt of about 50 tokens; greedy; max_tokens 4 or 16. For each case, the same request from:

- the Python client (`bridge.client`): request plus every entry as a float32 numpy array, with
  inline JSON and with base64;
- the Smalltalk client in a real Squeak VM (smalltalk/tests/binary_live.st): request plus
  parse (the JSON reader, then NSBinary's base64 decoding into FloatArrays), and the
  conversion for NeuroScope (`convertActivationsForNeuroScope:`), with base64 (the client's
  default) and with inline JSON (`activationsEncoding: 'json'`).

Times are the fastest of `--runs` runs (inside the VM, so the VM's start is not counted; the
Smalltalk JSON runs, which take minutes, run once). Target: the Smalltalk client's request +
parse within 3x of Python's for the 30-layer requests.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import requests

from benchmarks.report import MiB, machine_info, print_table, progress, write_result

PROMPT = ("Write a short, friendly paragraph for a museum visitor that explains why the sky looks blue "
          "during the day, why sunsets look red and orange, and what clouds are made of, using simple "
          "words and one everyday comparison.")
CASES = [(4, 4), (4, 16), (30, 4), (30, 16)]
TARGET = 3.0


def python_times(base_url: str, hooks: list, max_tokens: int, encoding: str, runs: int) -> float:
    from bridge.client import LMStudioNeuroScopeClient, entry_array

    best = float("inf")
    with LMStudioNeuroScopeClient(base_url, timeout=600) as client:
        for _ in range(runs):
            t0 = time.perf_counter()
            result = client.generate_with_activations(PROMPT, hooks, max_tokens=max_tokens, temperature=0,
                                                      encoding=encoding)
            for entries in result.activations.values():
                for e in entries:
                    entry_array(e)
            best = min(best, time.perf_counter() - t0)
    return best


def body_sizes(base_url: str, hooks: list, max_tokens: int) -> tuple[int, int, int]:
    """(inline JSON bytes, base64 bytes, prompt tokens) of the same request."""
    sizes = []
    for encoding in ("json", "base64"):
        r = requests.post(base_url + "/v1/chat/completions/with_activations", timeout=600, json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0,
            "activation_hooks": hooks, "activations_encoding": encoding})
        r.raise_for_status()
        sizes.append(len(r.content))
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
    return sizes[0], sizes[1], prompt_tokens


def main(argv: list[str] | None = None) -> None:
    from tests.test_smalltalk_binary import _REASON, run_live

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one run each; Smalltalk JSON only for 4 layers")
    ap.add_argument("--runs", type=int, default=3, help="runs per timing (the fastest counts)")
    ap.add_argument("--url", help="a running server with the default model (else one is started)")
    ap.add_argument("--no-st-json", action="store_true", help="skip the (minutes-long) Smalltalk JSON runs")
    args = ap.parse_args(argv)
    runs = 1 if args.quick else args.runs
    if _REASON is not None:
        progress(f"smalltalk_binary: skipped: {_REASON}")
        write_result("smalltalk_binary", {"skipped": _REASON, "machine": machine_info(with_blas=False)})
        return
    server = None
    if args.url:
        base_url = args.url.rstrip("/")
    else:
        from benchmarks.server_load import default_model_path
        from tests.server_process import ServerProcess

        server = ServerProcess(str(default_model_path()), Path(tempfile.mkdtemp(prefix="st-bench-")))
        server.wait_ready(300)
        base_url = server.base_url
    rows, results = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for layers, max_tokens in CASES:
                hooks = [{"layer_name": f"transformer.h.{i}", "component": c, "hook_id": f"transformer.h.{i}.{c}",
                          "capture_input": False, "capture_output": True}
                         for i in range(layers) for c in ("residual", "attention", "mlp")]
                json_bytes, b64_bytes, prompt_tokens = body_sizes(base_url, hooks, max_tokens)
                progress(f"smalltalk_binary: {layers} layers, {max_tokens} tokens: {json_bytes / MiB:.1f} MiB JSON")
                py_json = python_times(base_url, hooks, max_tokens, "json", runs)
                py_b64 = python_times(base_url, hooks, max_tokens, "base64", runs)
                out = Path(tmp) / f"b64-{layers}-{max_tokens}"
                out.mkdir()
                r, rep, _ = run_live(base_url, out, prompt=PROMPT, max_tokens=max_tokens, layers=layers,
                                     encoding="base64", dump=False, repeat=runs)
                if r.returncode != 0:
                    raise SystemExit(r.describe())
                st_b64, st_b64_conv = min(rep["request_ms"]) / 1000, min(rep["convert_ms"]) / 1000
                st_json = st_json_conv = None
                if not args.no_st_json and not (args.quick and layers > 4):
                    out = Path(tmp) / f"json-{layers}-{max_tokens}"
                    out.mkdir()
                    r, rep, _ = run_live(base_url, out, prompt=PROMPT, max_tokens=max_tokens, layers=layers,
                                         encoding="json", dump=False, repeat=1, timeout=900)
                    if r.returncode != 0:
                        raise SystemExit(r.describe())
                    st_json, st_json_conv = rep["request_ms"][0] / 1000, rep["convert_ms"][0] / 1000
                row = {"layers": layers, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens,
                       "json_mib": json_bytes / MiB, "base64_mib": b64_bytes / MiB,
                       "python_json_s": py_json, "python_base64_s": py_b64,
                       "st_base64_s": st_b64, "st_base64_convert_s": st_b64_conv,
                       "st_json_s": st_json, "st_json_convert_s": st_json_conv,
                       "ratio_st_base64_vs_python": st_b64 / py_json,
                       "ratio_st_base64_vs_python_base64": st_b64 / py_b64,
                       "bulk": rep.get("bulk")}
                results.append(row)
                rows.append([layers, max_tokens, f"{row['json_mib']:.1f}", f"{row['base64_mib']:.1f}",
                             f"{py_json:.2f}", f"{py_b64:.2f}", f"{st_b64:.2f}", f"{st_b64_conv:.2f}",
                             "-" if st_json is None else f"{st_json:.1f}",
                             "-" if st_json_conv is None else f"{st_json_conv:.1f}",
                             f"{row['ratio_st_base64_vs_python']:.2f}"])
    finally:
        if server is not None:
            server.stop()
    headers = ["layers", "max_tokens", "JSON MiB", "base64 MiB", "Python JSON s", "Python b64 s",
               "Smalltalk b64 s", "Smalltalk b64 convert s", "Smalltalk JSON s", "Smalltalk JSON convert s",
               "Smalltalk b64 / Python JSON"]
    print_table(headers, rows)
    big = [x for x in results if x["layers"] == 30]
    met = all(x["ratio_st_base64_vs_python"] <= TARGET for x in big)
    print(f"target: Smalltalk (base64) within {TARGET:g}x of Python for the 30-layer requests: "
          f"{'met' if met else 'NOT met'}")
    write_result("smalltalk_binary", {
        "description": "Smalltalk client (Squeak VM) vs Python client, same greedy requests on the default model; "
                       "hooks residual/attention/mlp per layer; times: fastest of the runs, seconds.",
        "prompt": PROMPT, "runs": runs, "headers": headers, "rows": rows, "results": results,
        "target": TARGET, "target_met": met, "machine": machine_info(with_blas=False)})


if __name__ == "__main__":
    sys.exit(main())
