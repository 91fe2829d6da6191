"""MLX arrays -> Arrow IPC in shared memory, against memcpy of the same bytes and inline JSON.

    python -m benchmarks.shm_throughput [--sizes 1 16 64 256] [--runs 7] [--baseline-writer FILE]

Per payload size: the write (plan + copy into a pooled, pre-faulted segment) and a plain
numpy copy of the same MLX arrays into a pre-faulted buffer, interleaved A/B in the same
run, medians; the write of a first capture into a fresh segment (creation and page faults);
a consumer's open (map + read schema + get every hook's array, then close); and orjson
encoding of the same arrays (capped: it runs at ~0.15 GB/s). Prints a table and writes
benchmarks/results/shm_throughput.json.

The decode case (30 hooks x 129 steps: 3,870 small arrays) measures per-array overhead;
its memcpy is one copy per array, as the write has to do, and `block` is the same bytes
copied as one block (the floor no per-array path reaches). `--baseline-writer` takes
another version of shm/writer.py (say `git show HEAD:shm/writer.py > /tmp/writer_before.py`)
and times its write in the same interleaved loop, so a change to the writer is measured
before/after side by side on one noisy machine. `--sizes` with no value: decode case only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pyarrow as pa

from engine.records import CaptureResult, HookRecord, StepTensor, to_numpy
from shm import ShmRegistry, open_capture
from shm.writer import write_capture

MiB = 1 << 20
D_MODEL = 4096  # 16 KiB per token per hook in float32
N_HOOKS = 8
JSON_CAP = 64 * MiB
RESULTS = Path(__file__).resolve().parent / "results" / "shm_throughput.json"


def payload(size: int, seed: int = 0) -> CaptureResult:
    """`size` bytes of float32 residual-stream captures: N_HOOKS hooks over one prefill."""
    tokens = max(size // (N_HOOKS * D_MODEL * 4), 1)
    mx.random.seed(seed)
    hooks = [
        HookRecord(f"resid_{i}", f"model.layers.{i}", f"model.layers.{i}", i, "residual", False, "float32",
                   [StepTensor(0, 0, mx.random.normal((tokens, D_MODEL)))])
        for i in range(N_HOOKS)
    ]
    mx.eval([h.steps[0].array for h in hooks])
    return CaptureResult("bench", "bench", list(range(tokens + 1)), ["t"] * (tokens + 1), tokens, hooks)


def decode_payload(layers: int = 30, d_model: int = 576, prompt: int = 32, decode: int = 128) -> CaptureResult:
    """A SmolLM2-135M-shaped generation: residual of every layer, prefill plus one-token steps
    (layers * (decode + 1) separate arrays: per-array overhead, not bandwidth, dominates)."""
    mx.random.seed(1)
    hooks = []
    for i in range(layers):
        steps = [StepTensor(0, 0, mx.random.normal((prompt, d_model)))]
        steps += [StepTensor(s, prompt + s - 1, mx.random.normal((1, d_model))) for s in range(1, decode + 1)]
        hooks.append(HookRecord(f"resid_{i}", f"model.layers.{i}", f"model.layers.{i}", i, "residual", False, "float32", steps))
    mx.eval([s.array for h in hooks for s in h.steps])
    n = prompt + decode + 1
    return CaptureResult("bench", "bench", list(range(n)), ["t"] * n, prompt, hooks)


def _memcpy(srcs: list[np.ndarray], dst: np.ndarray) -> float:
    t0 = time.perf_counter()
    at = 0
    for s in srcs:
        n = s.nbytes
        np.copyto(dst[at : at + n].view(s.dtype).reshape(s.shape), s)
        at += n
    return time.perf_counter() - t0


def _write(cap: CaptureResult, reg: ShmRegistry, i: int | str, writer=write_capture) -> tuple[float, object]:
    cap.capture_id = f"bench-{i}"
    t0 = time.perf_counter()
    h = writer(cap, reg)
    return time.perf_counter() - t0, h


def _load_writer(path: Path):
    """`write_capture` of another version of shm/writer.py (it imports today's shm.format and
    shm.lifecycle, so only the writer itself is compared)."""
    spec = importlib.util.spec_from_file_location("shm_writer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.write_capture


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _write_peak(cap: CaptureResult, reg: ShmRegistry, writer=write_capture) -> int | None:
    """How far the process's resident memory rose above where it was during one write into a
    reused segment, in KiB (a temporary second copy of the data would show here). Linux: the
    peak is reset through /proc/self/clear_refs; None elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
        _, h = _write(cap, reg, -2, writer)
        peak = _status_kib("VmHWM") - before
    except (OSError, KeyError):
        return None
    reg.release(h.capture_id)
    return peak


def _open(handle) -> float:
    t0 = time.perf_counter()
    with open_capture(handle) as cap:
        arrays = [h.data for h in cap]
        assert arrays
        del arrays
    return time.perf_counter() - t0


def bench(cap: CaptureResult, label: str, runs: int, reg: ShmRegistry, baseline=None) -> dict:
    import orjson

    srcs = [to_numpy(s.array) for h in cap.hooks for s in h.steps]
    nbytes = sum(s.nbytes for s in srcs)
    dst = np.empty(nbytes, np.uint8)
    dst[:] = 1  # pre-fault the memcpy target too
    block = np.concatenate([s.reshape(-1).view(np.uint8) for s in srcs])

    cold, h = _write(cap, reg, -1)  # first capture of this size: new segment + page faults
    reg.release(h.capture_id)
    peak = _write_peak(cap, reg)
    base_peak = _write_peak(cap, reg, baseline) if baseline is not None else None
    mem, wr, base, blk = [], [], [], []
    contenders = 3 if baseline is not None else 2
    for i in range(runs):  # interleaved, rotating which goes first
        for k in range(contenders):
            which = (i + k) % contenders
            if which == 0:
                mem.append(_memcpy(srcs, dst))
                t0 = time.perf_counter()
                np.copyto(dst, block)
                blk.append(time.perf_counter() - t0)
            else:
                t, h = _write(cap, reg, i, write_capture) if which == 1 else _write(cap, reg, f"base-{i}", baseline)
                (wr if which == 1 else base).append(t)
                reg.release(h.capture_id)  # every write finds the same warm segment
    del block
    _, h = _write(cap, reg, "open")  # untimed: the capture the consumer opens
    opens = [_open(h) for _ in range(max(runs * 3, 20))]
    stream_bytes = h.byte_size
    reg.release(h.capture_id)

    js = None
    if nbytes <= JSON_CAP:
        obj = {hk.hook_id: [to_numpy(s.array) for s in hk.steps] for hk in cap.hooks}
        times = []
        for _ in range(3 if nbytes <= 16 * MiB else 1):
            t0 = time.perf_counter()
            out = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
            times.append(time.perf_counter() - t0)
        js = {"s": statistics.median(times), "json_bytes": len(out)}
        del out

    m, w = statistics.median(mem), statistics.median(wr)
    row = {
        "case": label,
        "payload_mib": nbytes / MiB,
        "arrays": len(srcs),
        "stream_bytes": stream_bytes,
        "memcpy_gbps": nbytes / m / 1e9,
        "write_gbps": nbytes / w / 1e9,
        "write_vs_memcpy": m / w,
        "write_ms": w * 1e3,
        "memcpy_ms": m * 1e3,
        "memcpy_block_gbps": nbytes / statistics.median(blk) / 1e9,
        "write_vs_memcpy_block": statistics.median(blk) / w,
        "write_peak_rss_kib": peak,
        "baseline_write_peak_rss_kib": base_peak,
        "baseline_write_gbps": nbytes / statistics.median(base) / 1e9 if base else None,
        "baseline_vs_memcpy": m / statistics.median(base) if base else None,
        "cold_write_gbps": nbytes / cold / 1e9,
        "open_us": statistics.median(opens) * 1e6,
        "json_gbps": nbytes / js["s"] / 1e9 if js else None,
        "json_vs_shm": js["s"] / w if js else None,
        "runs": runs,
    }
    return row


def _kib(v: int | None) -> str:
    return f"{v:12d}" if v is not None else f"{'-':>12}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1, 16, 64, 256],
                    help="prefill payload sizes in MiB (none: the decode case only)")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--baseline-writer", type=Path, default=None,
                    help="another shm/writer.py to time side by side (before/after a change)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    baseline = _load_writer(args.baseline_writer) if args.baseline_writer else None

    rows = []
    with tempfile.TemporaryDirectory() as state, ShmRegistry(state_dir=state) as reg:
        warm = payload(64 * 1024)  # first-call costs (pyarrow IPC, MLX) out of the cold numbers
        reg.release(write_capture(warm, reg).capture_id)
        for mib in args.sizes:
            rows.append(bench(payload(mib * MiB), "prefill", args.runs, reg, baseline))
        rows.append(bench(decode_payload(), "decode", args.runs, reg, baseline))
    base_head = f" {'baseline':>8}" if baseline else ""
    print(f"{'case':>8} {'MiB':>5} {'arrays':>6} {'memcpy GB/s':>11} {'write GB/s':>10} {'ratio':>6}{base_head} "
          f"{'block GB/s':>10} {'cold GB/s':>9} {'open us':>8} {'json GB/s':>9} {'json/shm':>9} {'peak RSS KiB':>12}")
    for r in rows:
        js = f"{r['json_gbps']:9.3f} {r['json_vs_shm']:8.0f}x" if r["json_gbps"] else f"{'skipped':>9} {'':>9}"
        base = f" {r['baseline_vs_memcpy']:8.2f}" if baseline else ""
        print(f"{r['case']:>8} {r['payload_mib']:5.1f} {r['arrays']:6d} {r['memcpy_gbps']:11.2f} {r['write_gbps']:10.2f} "
              f"{r['write_vs_memcpy']:6.2f}{base} {r['memcpy_block_gbps']:10.2f} {r['cold_write_gbps']:9.2f} "
              f"{r['open_us']:8.0f} {js} {_kib(r['write_peak_rss_kib'])}")
    if baseline:
        print(f"ratio: write / memcpy (one copy per array); baseline: {args.baseline_writer}'s write / the same "
              f"memcpy; its peak RSS KiB: {[r['baseline_write_peak_rss_kib'] for r in rows]}")
    result = {
        "benchmark": "shm_throughput",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "numpy": np.__version__, "pyarrow": pa.__version__, "mlx": mx.__version__,
                    "load_avg": os.getloadavg()},
        "payload": {
            "prefill": f"{N_HOOKS} residual hooks, float32, d_model={D_MODEL}, one prefill step",
            "decode": "30 residual hooks, float32, d_model=576, 32-token prefill + 128 decode steps",
        },
        "memcpy": "numpy copyto of the same MLX arrays (already numpy views) into a pre-faulted buffer",
        "memcpy_block": "the same bytes as one contiguous copy",
        "write_peak_rss": "rise of the process's peak resident memory during one write into a reused segment",
        "baseline_writer": str(args.baseline_writer) if args.baseline_writer else None,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
