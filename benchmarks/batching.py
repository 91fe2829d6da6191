"""Tokens/s under concurrent clients: nsbridge (capture off, and residual capture of every layer)
against mlx_lm.server, same model, same prompts, side by side in one run.

    python -m benchmarks.batching [--clients 1 4 8 16] [--max-tokens 64] [--requests-per-client 2] [--quick]

The script starts both servers on loopback with the default model (SmolLM2-135M, float32:
`engine.default_model.ensure_default_model()`):

- `mlx_lm.server` (mlx-lm's own server, which batches concurrent requests with its
  `BatchGenerator`), with Debian's OpenBLAS preloaded (`LD_PRELOAD`) as nsbridge loads it
  itself (engine/blas.py; DESIGN.md "the BLAS trap": without it mlx's bundled reference BLAS
  is ~33x slower), and `HF_HUB_OFFLINE=1` with `~/.cache/huggingface/hub` present (it
  crashes offline without that folder);
- `nsbridge serve`, given `--max-batch-size` when its `--help` lists the flag.

For each number of clients, three configurations run one after the other, in an order that
rotates from level to level: `mlx_lm` (`/v1/chat/completions`), `off` (nsbridge
`/v1/chat/completions`) and `capture` (nsbridge `/v1/chat/completions/with_activations`
with the residual stream of every layer, shm transport; each client releases its capture
as soon as it has read the handle). Every client sends `--requests-per-client` requests one
after another: greedy, `max_tokens` each, a different prompt per request (a list of long-answer
prompts, the same list for every configuration, so that no server answers from a prompt
cache). tokens/s = completion tokens of all requests (the servers' `usage`) / wall time from
the first request sent to the last answer. A warm-up request per configuration runs first.

Prints a table and writes benchmarks/results/batching.json (and batching.png when
matplotlib is installed: the `bench` extra).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import requests

from benchmarks.report import RESULTS_DIR, machine_info, percentile, print_table, progress, write_result
from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("mlx_lm", "off", "capture")
TARGET_OFF_VS_MLX = 1.0  # issue 15: capture off >= 1.0x mlx_lm.server at every concurrency
TARGET_CAPTURE_VS_OFF = 0.9  # all-layer residual capture >= 0.9x our own capture-off throughput

TOPICS = [
    "a lighthouse keeper who finds a message in a bottle", "the history of the printing press",
    "how bees build a hive", "a journey across the Sahara on a camel", "why the sky is blue",
    "a robot learning to paint", "the life cycle of a star", "a small town preparing for a festival",
    "how bread is made from wheat", "a sailor lost in a storm", "the invention of the telephone",
    "a fox and a crow who become friends", "how rivers shape valleys", "a chess match between two rivals",
    "the first day at a new school", "how volcanoes form", "a garden through the four seasons",
    "a detective solving a quiet mystery", "the building of a medieval cathedral", "a trip to the moon",
]


def prompt(i: int) -> str:
    """Request i's prompt: long answers (so that generation runs to max_tokens), all different."""
    topic = TOPICS[i % len(TOPICS)]
    return f"Write a long, detailed story about {topic}. (Request {i}.)"


# --- servers ---------------------------------------------------------------------------------
def openblas_path() -> str | None:
    """The OpenBLAS library nsbridge loads itself (engine/blas.py's candidates), for LD_PRELOAD."""
    from engine.blas import _CANDIDATES

    for pattern in _CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


class MlxLmServer(ServerProcess):
    """`mlx_lm.server` on a free loopback port (the test suite's server process, another command)."""

    def __init__(self, model: Path, state_dir: Path, env: dict):
        self.mlx_model = model
        super().__init__(state_dir=state_dir, env=env)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlx_lm", "server", "--model", str(self.mlx_model), "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "WARNING"]


def has_library(server: ServerProcess, fragment: str) -> bool:
    """Whether the server process has a library whose path contains `fragment` mapped (Linux)."""
    try:
        return fragment in Path(f"/proc/{server.proc.pid}/maps").read_text()
    except OSError:
        return False


def cpu_seconds(server: ServerProcess) -> float | None:
    """User + system CPU time of the server process so far (Linux), all its threads."""
    try:
        fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def start_mlx_lm(model: Path, log_dir: Path) -> ServerProcess:
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    blas = openblas_path()
    if blas:
        env["LD_PRELOAD"] = ":".join(p for p in (blas, os.environ.get("LD_PRELOAD", "")) if p)
    (Path.home() / ".cache" / "huggingface" / "hub").mkdir(parents=True, exist_ok=True)
    state = log_dir / "mlx_lm"
    state.mkdir()
    return MlxLmServer(model, state, env)


def nsbridge_flags() -> str:
    try:
        return subprocess.run([sys.executable, "-m", "control.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def start_nsbridge(model: Path, log_dir: Path, max_batch: int, queue: int) -> tuple[ServerProcess, list[str]]:
    extra = ["--queue-size", str(queue)]
    if "--max-batch-size" in nsbridge_flags():
        extra += ["--max-batch-size", str(max_batch)]
    state = log_dir / "nsbridge"
    state.mkdir()
    return ServerProcess(str(model), state, extra, log_level="warning"), extra


# --- clients ---------------------------------------------------------------------------------
def request_for(config: str, i: int, max_tokens: int, n_layers: int) -> tuple[str, bytes]:
    body: dict = {"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
                  "temperature": 0.0}
    if config != "capture":
        return "/v1/chat/completions", orjson.dumps(body)
    body["activation_hooks"] = [{"layer_name": f"model.layers.{k}", "component": "residual",
                                 "hook_id": f"resid_{k}"} for k in range(n_layers)]
    body["activations_transport"] = "shm"
    return "/v1/chat/completions/with_activations", orjson.dumps(body)


def run_level(config: str, base_url: str, clients: int, per_client: int, max_tokens: int, n_layers: int,
              first_request: int, label: str) -> dict:
    """`clients` threads, each sending `per_client` requests in turn; tokens/s over the wall time."""
    lock = threading.Lock()
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    total = clients * per_client
    t_start = time.perf_counter()

    def client(c: int) -> None:
        s = requests.Session()
        for j in range(per_client):
            path, payload = request_for(config, first_request + c * per_client + j, max_tokens, n_layers)
            t0 = time.perf_counter()
            try:
                r = s.post(base_url + path, data=payload, headers={"Content-Type": "application/json"}, timeout=1800)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                data = orjson.loads(r.content)
                if config == "capture":  # read the handle, then give the capture back at once
                    cap = data["capture"]
                    assert cap["handle"]
                    s.delete(f"{base_url}/v1/activations/{cap['capture_id']}", timeout=60).raise_for_status()
                n = int(data["usage"]["completion_tokens"])
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    tokens.append(n)
                    done, sofar = len(latencies), sum(tokens)
                progress(f"batching: {label} clients={clients}: {done}/{total} requests, {sofar} tokens, "
                         f"{sofar / (time.perf_counter() - t_start):.1f} tok/s")
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:400])
                progress(f"batching: {label} clients={clients}: error {errors[-1][:200]}")

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    lat = [x * 1e3 for x in latencies]
    return {
        "config": config, "clients": clients, "requests": total, "completed": len(latencies),
        "errors": len(errors), "error_samples": errors[:3], "wall_s": wall,
        "completion_tokens": sum(tokens), "tokens_per_request": (sum(tokens) / len(tokens)) if tokens else None,
        "tokens_per_s": sum(tokens) / wall if tokens else 0.0,
        "p50_ms": percentile(lat, 50) if lat else None, "p95_ms": percentile(lat, 95) if lat else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("batching: matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    x = [r["clients"] for r in rows]
    for key, label, style in (("mlx_lm_tok_s", "mlx_lm.server", "k--o"), ("off_tok_s", "nsbridge, capture off", "o-"),
                              ("capture_tok_s", "nsbridge, residual capture, all layers", "s-")):
        ax.plot(x, [r[key] for r in rows], style, label=label)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("completion tokens / s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(c) for c in x])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="passed to nsbridge serve when it has the flag (default: the largest --clients, at least 16)")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="clients 1 and 4, 16 tokens, one request per client")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=RESULTS_DIR / "batching.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.max_tokens, args.requests_per_client = [1, 4], 16, 1
    max_batch = args.max_batch_size or max(16, *args.clients)

    from engine.default_model import ensure_default_model

    progress("batching: preparing the default model")
    model = ensure_default_model()
    machine = machine_info()
    servers: dict[str, ServerProcess] = {}
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="nsbridge-batching-") as tmp:
        log_dir = Path(tmp)
        try:
            if "mlx_lm" in args.configs:
                progress("batching: starting mlx_lm.server (OpenBLAS preloaded)")
                servers["mlx_lm"] = start_mlx_lm(model, log_dir)
            if {"off", "capture"} & set(args.configs):
                progress("batching: starting nsbridge serve")
                servers["nsbridge"], ns_flags = start_nsbridge(model, log_dir, max_batch, max(64, 4 * max(args.clients)))
            for s in servers.values():
                s.wait_ready(600)
            n_layers = 0
            if "nsbridge" in servers:
                info = requests.get(servers["nsbridge"].base_url + "/v1/models", timeout=30).json()["data"][0]
                n_layers = int(info["n_layers"])
            blas = openblas_path()
            loaded = {name: (has_library(s, "openblas") if blas else False) for name, s in servers.items()}
            progress(f"batching: OpenBLAS mapped: {loaded}")
            url = {c: servers["mlx_lm" if c == "mlx_lm" else "nsbridge"].base_url for c in args.configs}

            for c in args.configs:  # warm-up: first-request costs out of the numbers
                progress(f"batching: warm-up {c}")
                w = run_level(c, url[c], 1, 1, min(args.max_tokens, 8), n_layers, 10_000, f"warm-up {c}")
                if w["errors"]:
                    raise RuntimeError(f"warm-up of {c} failed: {w['error_samples']}")

            measured: list[dict] = []
            first = 0
            for li, clients in enumerate(args.clients):
                k = li % len(args.configs)
                order = args.configs[k:] + args.configs[:k]
                for c in order:
                    progress(f"batching: {c} with {clients} clients x {args.requests_per_client} requests, "
                             f"{args.max_tokens} tokens each")
                    idle = {n: s for n, s in servers.items() if n != ("mlx_lm" if c == "mlx_lm" else "nsbridge")}
                    cpu0 = {n: cpu_seconds(s) for n, s in idle.items()}
                    row = run_level(c, url[c], clients, args.requests_per_client, args.max_tokens, n_layers, first, c)
                    row["order"] = order.index(c)
                    # CPU the idle server took meanwhile (it should be ~0: both share the cores)
                    row["idle_server_cpu_s"] = {n: round(cpu_seconds(s) - cpu0[n], 2) for n, s in idle.items()
                                                if cpu0[n] is not None}
                    measured.append(row)
                    progress(f"batching: {c} clients={clients}: {row['tokens_per_s']:.1f} tok/s "
                             f"({row['completion_tokens']} tokens in {row['wall_s']:.1f}s, {row['errors']} errors)")
                first += clients * args.requests_per_client  # the same prompts for every configuration

            rows = []
            for clients in args.clients:
                by = {r["config"]: r for r in measured if r["clients"] == clients}
                mlx = by.get("mlx_lm", {}).get("tokens_per_s")
                off = by.get("off", {}).get("tokens_per_s")
                cap = by.get("capture", {}).get("tokens_per_s")
                rows.append({
                    "clients": clients, "mlx_lm_tok_s": mlx, "off_tok_s": off, "off_vs_mlx_lm": _ratio(off, mlx),
                    "capture_tok_s": cap, "capture_vs_off": _ratio(cap, off),
                    "tokens_per_request": {c: by[c]["tokens_per_request"] for c in by},
                    "p50_ms": {c: by[c]["p50_ms"] for c in by},
                    "errors": sum(by[c]["errors"] for c in by),
                })
            logs = {name: s.log_tail(2000) for name, s in servers.items()} \
                if any(r["errors"] for r in measured) else {}
        finally:
            for s in servers.values():
                s.stop()

    print_table(["clients", "mlx_lm tok/s", "nsbridge off tok/s", "off/mlx_lm", "nsbridge capture tok/s",
                 "capture/off", "errors"],
                [[r["clients"], r["mlx_lm_tok_s"], r["off_tok_s"], r["off_vs_mlx_lm"], r["capture_tok_s"],
                  r["capture_vs_off"], r["errors"]] for r in rows])
    met = {
        "off_vs_mlx_lm": all((r["off_vs_mlx_lm"] or 0) >= TARGET_OFF_VS_MLX for r in rows),
        "capture_vs_off": all((r["capture_vs_off"] or 0) >= TARGET_CAPTURE_VS_OFF for r in rows),
    }
    result = {
        "benchmark": "batching",
        "machine": machine,
        "quick": args.quick,
        "description": (f"default model ({model.name}), greedy, max_tokens {args.max_tokens}, "
                        f"{args.requests_per_client} request(s) per client, a different long-answer prompt per "
                        f"request (the same prompts for every configuration); tokens/s = completion tokens / wall "
                        f"time; capture = residual stream of all {n_layers} layers, shm transport, released at once"),
        "servers": {name: {"command": " ".join(s.command()), "openblas_mapped": loaded.get(name)}
                    for name, s in servers.items()},
        "openblas": openblas_path(),
        "nsbridge_flags": ns_flags if "nsbridge" in servers else None,
        "targets": {"off_vs_mlx_lm": TARGET_OFF_VS_MLX, "capture_vs_off": TARGET_CAPTURE_VS_OFF},
        "targets_met": met,
        "rows": rows,
        "runs": measured,
        "server_log_tails": logs,
    }
    png = plot(rows, args.plot, f"{model.name}, {args.max_tokens} tokens/request, greedy; "
                                f"load {machine.get('loadavg', '?')}") if rows else None
    result["plot"] = str(png) if png else None
    path = write_result("batching", result, args.out)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return result


if __name__ == "__main__":
    main()
