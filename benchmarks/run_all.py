"""Run every benchmark, then write the summary (JSON, markdown table, PNG plot).

    python -m benchmarks.run_all [--quick] [--only NAME ...] [--skip NAME ...] [--tl-python PATH]

`make bench` runs this. Each benchmark runs as its own process (`python -m benchmarks.NAME`),
so one failing or missing script does not stop the others; its table goes to stdout and its
progress to stderr. Results: benchmarks/results/NAME.json, summary.json, summary.md,
summary.png, and the results block of benchmarks/README.md. The full run takes about fifteen
minutes on 2 cores; `--quick` about half that. Timings are only comparable within one run on
an otherwise idle machine: the load average is recorded with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import BENCHMARKS, RESULTS_DIR, build, machine_info, md_table, progress

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Arguments per benchmark: (full, quick). Scripts written elsewhere are called with the options
# their --help lists; an option they lack is dropped.
ARGS = {
    "shm_throughput": (["--sizes", "1", "16", "64", "256"], ["--sizes", "1", "16", "64", "--runs", "5"]),
    "transport_e2e": ([], ["--quick"]),
    "capture_overhead": (["--prompt", "512", "--decode", "64", "--runs", "3"],
                         ["--prompt", "512", "--decode", "32", "--runs", "2"]),
    "scaling": ([], ["--quick"]),
    "server_load": ([], ["--quick"]),
    "reference_transformerlens": ([], ["--quick"]),
    "interventions": ([], ["--quick"]),
    "smalltalk_binary": ([], ["--quick"]),
    "batching": ([], ["--quick"]),
    "attribution": ([], ["--quick"]),
    "harvest": ([], ["--quick"]),
}
TIMEOUT_S = {"capture_overhead": 900, "batching": 2400, "attribution": 1800, "harvest": 1800, "default": 900}


def _supported(name: str, args: list[str]) -> list[str]:
    """Keep only the options that the script's --help mentions (with their values)."""
    try:
        help_text = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired:
        return args
    out, keep = [], True
    for a in args:
        if a.startswith("--"):
            keep = a in help_text
            if not keep:
                progress(f"run_all: {name} has no {a} option; running without it")
        if keep:
            out.append(a)
    return out


def run_one(name: str, quick: bool, extra_env: dict[str, str]) -> dict:
    script = HERE / f"{name}.py"
    if not script.exists():
        progress(f"run_all: {name}: benchmarks/{name}.py is missing; skipped")
        return {"name": name, "status": "missing", "seconds": 0.0}
    full, short = ARGS.get(name, ([], []))
    args = _supported(name, short if quick else full)
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    result_file = RESULTS_DIR / f"{name}.json"
    before = result_file.stat().st_mtime if result_file.exists() else None
    progress(f"run_all: {name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **extra_env},
                              timeout=TIMEOUT_S.get(name, TIMEOUT_S["default"]))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = round(time.perf_counter() - t0, 1)
    fresh = result_file.exists() and result_file.stat().st_mtime != before
    status = "ok" if code == 0 and fresh else (f"failed ({code})" if code != 0 else "no result file")
    progress(f"run_all: {name}: {status} in {seconds:.0f}s")
    data = None
    if status == "ok":  # read it now: another process may write the same file later
        try:
            data = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            status = f"unreadable result ({exc})"
    return {"name": name, "status": status, "seconds": seconds, "command": "python -m " + " ".join(cmd[2:]),
            "data": data}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer runs (about half the time)")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    ap.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[], help="do not run these")
    ap.add_argument("--tl-python", help="interpreter with transformer_lens for the TransformerLens comparisons "
                                        "(or $NSBRIDGE_TL_PYTHON)")
    ap.add_argument("--no-readme", action="store_true", help="leave benchmarks/README.md alone")
    args = ap.parse_args(argv)

    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    env = {"NSBRIDGE_TL_PYTHON": args.tl_python} if args.tl_python else {}
    machine = machine_info()
    machine["mode"] = "quick" if args.quick else "full"
    progress(f"run_all: {machine['cpu']}, {machine['cores']} cores, BLAS {machine['blas']}, "
             f"load {machine.get('loadavg')}; running {', '.join(names)}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = [run_one(n, args.quick, env) for n in names]
    machine["total_seconds"] = round(time.perf_counter() - t0, 1)
    try:
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    results = {r["name"]: r.pop("data") for r in runs if r.get("data") is not None}
    for r in runs:
        r.pop("data", None)
    for name, data in results.items():  # the files as this run wrote them (in case something rewrote them)
        (RESULTS_DIR / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    summary = build(RESULTS_DIR, machine, readme=not args.no_readme, runs=runs, results=results)

    print("\n" + (RESULTS_DIR / "summary.md").read_text())
    print(md_table(["benchmark", "status", "seconds"], [[r["name"], r["status"], r["seconds"]] for r in runs]))
    print(f"\nwrote {RESULTS_DIR / 'summary.json'}, summary.md" + (", summary.png" if summary.get("plot") else "")
          + f" in {machine['total_seconds']:.0f}s")
    return 0 if all(r["status"] in ("ok", "missing") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
