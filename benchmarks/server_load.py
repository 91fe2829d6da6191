"""Server throughput and latency under concurrent clients on loopback.

    python -m benchmarks.server_load [--model tiny|default|both] [--clients 1 4] [--requests 40] [--rounds 3]

Starts its own `nsbridge serve` (a real server process) and drives it with client threads
(`requests`, one session per thread), a bounded number of requests per round. Scenarios:

- `chat`: a short chat completion (`/v1/chat/completions`, 8 new tokens, greedy);
- `act_inline`: the same request on `/with_activations`, residual stream of every layer,
  delivered inline as JSON (the client parses it into numpy arrays);
- `act_shm`: the same capture delivered as a shared-memory handle; the client maps it with
  `shm.open_capture`, reads every value once, closes it and releases the capture.

Scenarios are interleaved round by round (rotating order); requests/s is the median over
rounds, latency percentiles are over all requests of a scenario. The model is a tiny random
llama by default (what is measured is then the server itself: HTTP, queue, JSON, shm) and
the real default model (SmolLM2-135M) with `--model default|both` (generation dominates).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import requests

from benchmarks.report import MiB, machine_info, median, percentile, print_table, progress, write_result
from tests.server_process import ServerProcess

PROMPT = "Hello! In one short sentence, what is the capital of France?"


def tiny_model_path() -> Path:
    """A tiny random llama (3 layers, d_model 64) in the cache, built once with tests/tiny_models."""
    from engine import paths
    from tests.tiny_models import make_tiny_model

    return make_tiny_model(paths.home() / "bench" / "tiny-llama", "llama")


def default_model_path() -> Path:
    from engine.default_model import ensure_default_model

    return ensure_default_model()


# --- clients -----------------------------------------------------------------------------------
def residual_hooks(n_layers: int) -> list[dict]:
    return [{"layer_name": f"model.layers.{i}", "component": "residual", "hook_id": f"resid_{i}"}
            for i in range(n_layers)]


def make_body(scenario: str, n_layers: int, max_tokens: int) -> tuple[str, dict]:
    body: dict = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0}
    if scenario == "chat":
        return "/v1/chat/completions", body
    body["activation_hooks"] = residual_hooks(n_layers)
    body["activations_transport"] = "inline" if scenario == "act_inline" else "shm"
    return "/v1/chat/completions/with_activations", body


def consume(scenario: str, session: requests.Session, base_url: str, resp: requests.Response) -> int:
    """What a real client does with the answer; returns the activation bytes it now holds."""
    data = orjson.loads(resp.content)
    if scenario == "chat":
        assert data["choices"][0]["message"] is not None
        return 0
    if scenario == "act_inline":
        n = 0
        for entries in data["activations"].values():
            for e in entries:
                a = np.asarray(e["data"], dtype=np.float32)
                n += a.nbytes
        return n
    from shm import open_capture

    cap = data["capture"]
    n = 0
    with open_capture(cap["handle"]) as view:
        for h in view:
            n += h.data.nbytes
            float(h.data.sum(dtype=np.float64))  # read every value once (maps the pages)
    session.delete(f"{base_url}/v1/activations/{cap['capture_id']}", timeout=30).raise_for_status()
    return n


def run_batch(base_url: str, scenario: str, n_requests: int, clients: int, n_layers: int,
              max_tokens: int) -> dict:
    path, body = make_body(scenario, n_layers, max_tokens)
    payload = orjson.dumps(body)
    lock = threading.Lock()
    todo = [n_requests]
    latencies: list[float] = []
    errors: list[str] = []
    nbytes: list[int] = []
    tokens: list[int] = []

    def worker():
        s = requests.Session()
        while True:
            with lock:
                if todo[0] <= 0:
                    return
                todo[0] -= 1
            t0 = time.perf_counter()
            try:
                r = s.post(base_url + path, data=payload, headers={"Content-Type": "application/json"}, timeout=300)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                n = consume(scenario, s, base_url, r)
                dt = time.perf_counter() - t0
                usage = orjson.loads(r.content).get("usage", {}) if scenario == "chat" else {}
                with lock:
                    latencies.append(dt)
                    nbytes.append(n)
                    tokens.append(int(usage.get("completion_tokens", 0)))
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": errors, "wall_s": wall, "bytes": nbytes, "tokens": tokens}


SCENARIOS = ("chat", "act_inline", "act_shm")


def bench_model(label: str, model_path: Path, note: str, clients_list: list[int], n_requests: int, rounds: int,
                max_tokens: int) -> dict:
    progress(f"server_load: starting a server with the {label} model")
    with ServerProcess(str(model_path), extra=["--queue-size", str(max(64, 2 * max(clients_list)))]) as srv:
        info = requests.get(srv.base_url + "/v1/models", timeout=10).json()["data"][0]
        n_layers = int(info["n_layers"])
        for sc in SCENARIOS:  # warm-up: first-request costs (graph build, segment creation)
            run_batch(srv.base_url, sc, 2, 1, n_layers, max_tokens)
        rows = []
        for clients in clients_list:
            acc = {sc: {"latencies": [], "errors": [], "rps": [], "bytes": [], "tokens": [], "n": 0} for sc in SCENARIOS}
            for r in range(rounds):
                order = SCENARIOS[r % 3:] + SCENARIOS[: r % 3]
                for sc in order:
                    progress(f"server_load: {label} {sc} clients={clients} round {r + 1}/{rounds}")
                    b = run_batch(srv.base_url, sc, n_requests, clients, n_layers, max_tokens)
                    a = acc[sc]
                    a["latencies"] += b["latencies"]
                    a["errors"] += b["errors"]
                    a["bytes"] += b["bytes"]
                    a["tokens"] += b["tokens"]
                    a["n"] += n_requests
                    a["rps"].append(len(b["latencies"]) / b["wall_s"])
            for sc in SCENARIOS:
                a = acc[sc]
                lat = [x * 1e3 for x in a["latencies"]]
                rows.append({
                    "scenario": sc, "clients": clients, "requests": a["n"], "rounds": rounds,
                    "req_per_s": median(a["rps"]), "req_per_s_rounds": a["rps"],
                    "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
                    "mean_ms": sum(lat) / len(lat) if lat else None,
                    "errors": len(a["errors"]), "error_samples": a["errors"][:3],
                    "payload_mib": (median(a["bytes"]) / MiB) if sc != "chat" and a["bytes"] else None,
                })
        log_tail = srv.log_tail(1500)
    return {
        "model": label, "model_note": note, "n_layers": n_layers, "model_info": info,
        "description": (f"{len(SCENARIOS)} scenarios interleaved over {rounds} rounds of {n_requests} requests each; "
                        f"prompt {PROMPT!r}, max_tokens {max_tokens}, greedy; activations = residual stream of all "
                        f"{n_layers} layers for every position"),
        "rows": rows,
        "server_log_tail": log_tail if any(x["errors"] for x in rows) else "",
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "default", "both"), default="both")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent clients (tiny model)")
    ap.add_argument("--clients-default", type=int, nargs="+", default=[4], help="concurrent clients (default model)")
    ap.add_argument("--requests", type=int, default=None, help="requests per scenario per round (tiny model)")
    ap.add_argument("--requests-default", type=int, default=None, help="requests per scenario per round (default model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 clients, fewer requests")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.clients = ("tiny" if args.model == "both" else args.model), [4]
    n_tiny = args.requests or (24 if args.quick else 40)
    n_default = args.requests_default or (6 if args.quick else 8)

    blocks = []
    if args.model in ("tiny", "both"):
        try:
            path = tiny_model_path()
            blocks.append(bench_model("tiny-llama", path, "random weights, 3 layers, d_model 64: measures the server",
                                      args.clients, n_tiny, args.rounds, args.max_tokens))
        except ImportError as exc:
            progress(f"server_load: cannot build the tiny model ({exc}); install the 'test' extra. Skipping it.")
    if args.model in ("default", "both"):
        blocks.append(bench_model("smollm2-135m", default_model_path(),
                                  "real default model, 30 layers, d_model 576: generation dominates",
                                  args.clients_default, n_default, args.rounds, args.max_tokens))
    for b in blocks:
        print(f"\nserver_load: {b['model']} ({b['model_note']})")
        print_table(["scenario", "clients", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "MiB/req"],
                    [[x["scenario"], x["clients"], x["requests"], x["req_per_s"], x["p50_ms"], x["p95_ms"],
                      x["p99_ms"], x["errors"], x["payload_mib"]] for x in b["rows"]])
    result = {"benchmark": "server_load", "machine": machine_info(), "quick": args.quick, "models": blocks}
    path = write_result("server_load", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
