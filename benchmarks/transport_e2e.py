"""End-to-end: how long it takes to get N MiB of activations into a consumer process, by transport.

    python -m benchmarks.transport_e2e [--sizes 1 16 64] [--model-sizes 1 16] [--runs 5] [--quick]

Transports, each timed from the client's request until the consumer (this process) holds
numpy arrays of every captured value:

- `inline JSON`: the activations inside the JSON response (nested lists, as NeuroScope reads
  them), parsed with orjson and turned into float32 arrays;
- `Arrow over HTTP`: the capture is written to shared memory, then fetched as an Arrow IPC
  stream with `GET /v1/activations/{id}` and read with `shm.read_capture_bytes`;
- `shm handle`: the response carries a handle; `shm.open_capture` maps it (zero-copy);
- `memcpy`: a plain copy of the same bytes inside the consumer: the physical limit.

Two parts. *Synthetic*: a server process running the real control app (`control.app`), whose
delivery step (`Delivery.deliver`: the same JSON encoder, the same shm writer, the same routes)
is fed a capture of model-like shape (float32 residual/attention/MLP tensors, d_model 576, one
prefill step and 8 decode steps) of exactly N MiB, so the time is delivery only. *Default
model*: real `/with_activations` requests to a real server running SmolLM2-135M (hooks and
prompt length chosen to reach N MiB), against the same chat request without activations, so
the difference is capture plus delivery. Transports are interleaved in rotating order, several
runs, medians. Every run also records the time for the consumer to read each value once
(`*_read_ms`, which for shm includes the page faults of the fresh mapping).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import requests

from benchmarks.report import MiB, machine_info, median, print_table, progress, write_result
from benchmarks.server_load import default_model_path
from tests.server_process import ServerProcess

D_MODEL = 576  # the default model's width, so the synthetic capture looks like its captures
DECODE_STEPS = 8
COMPONENTS = ("residual", "attention", "mlp")
INLINE_CAP_MIB = 64  # inline JSON runs at ~0.03 GB/s end to end: larger payloads take minutes


# --- the synthetic server (runs in its own process) ------------------------------------------
def synthetic_capture(nbytes: int, seed: int = 0):
    """A CaptureResult of float32 MLX arrays totalling about `nbytes`, shaped like the default model's."""
    from tests.synthetic_capture import synthetic_capture as build

    per_row = D_MODEL * 4
    rows_total = max(nbytes // per_row, 1)
    n_layers = 30
    while n_layers > 1 and rows_total // (len(COMPONENTS) * n_layers) < DECODE_STEPS + 4:
        n_layers -= 1
    rows = max(rows_total // (len(COMPONENTS) * n_layers), DECODE_STEPS + 1)
    return build(COMPONENTS, range(n_layers), prompt_len=rows - DECODE_STEPS, decode_steps=DECODE_STEPS,
                 d_model=D_MODEL, seed=seed)


def serve_synthetic(port: int, state_dir: str, sizes: list[int]) -> None:
    """The real control app plus one route that delivers a prepared capture as a chat response would."""
    import engine  # noqa: F401  (OpenBLAS before mlx.core)
    import uvicorn
    from starlette.requests import Request
    from starlette.routing import Route

    from control.app import AppConfig, ORJSONResponse, create_app
    from control.service import ModelService, ServiceConfig
    from engine.generate import Completion

    captures = {str(mib): synthetic_capture(int(mib * MiB), seed=i) for i, mib in enumerate(sizes)}
    config = AppConfig(state_dir=state_dir, shm_ttl_s=600.0)
    app = create_app(config, ModelService(ServiceConfig()))
    server = app.state.server

    async def deliver(request: Request):
        cap = captures[request.path_params["name"]]
        transport = request.query_params.get("transport", "inline")
        cap.capture_id = "cap_" + secrets.token_hex(8)
        done = Completion(text="", token_ids=cap.token_ids, tokens=cap.tokens, prompt_tokens=cap.prompt_tokens,
                          finish_reason="length", model_id=cap.model_id, capture=cap)
        out = await server.delivery.deliver(done, transport, "json")
        return ORJSONResponse(out)

    async def sizes_route(request: Request):
        return ORJSONResponse({name: {"bytes": sum(int(np.prod(s.array.shape)) * 4 for h in c.hooks for s in h.steps),
                                      "hooks": len(c.hooks), "rows": len(c.token_ids), "prompt": c.prompt_tokens}
                               for name, c in captures.items()})

    app.router.routes.append(Route("/bench/deliver/{name}", deliver, methods=["POST"]))
    app.router.routes.append(Route("/bench/sizes", sizes_route, methods=["GET"]))
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


class SyntheticServer(ServerProcess):
    """The real control app plus a route that delivers prepared captures of given sizes."""

    ready_path = "/bench/sizes"

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        super().__init__()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.transport_e2e", "--serve-synthetic", str(self.port),
                str(self.state_dir), *[str(s) for s in self.sizes]]


# --- consumers ---------------------------------------------------------------------------------
def _read_all(arrays) -> float:
    return float(sum(float(a.sum(dtype=np.float64)) for a in arrays))


def consume_inline(data: dict) -> list[np.ndarray]:
    return [np.asarray(e["data"], dtype=np.float32) for entries in data["activations"].values() for e in entries]


def fetch(session: requests.Session, base: str, transport: str, post_path: str, body: bytes | None) -> tuple[float, float, int]:
    """One delivery: (ms until arrays are in hand, ms after reading every value once, bytes held)."""
    from shm import open_capture, read_capture_bytes

    headers = {"Content-Type": "application/json"}
    server_transport = "inline" if transport == "inline" else "shm"
    if body is None:  # synthetic: the transport is a query parameter
        url, payload = f"{base}{post_path}?transport={server_transport}", b"{}"
    else:
        url = base + post_path
        req = orjson.loads(body)
        if transport != "plain":
            req["activations_transport"] = server_transport
        payload = orjson.dumps(req)
    t0 = time.perf_counter()
    r = session.post(url, data=payload, headers=headers, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{transport}: HTTP {r.status_code}: {r.text[:300]}")
    data = orjson.loads(r.content)
    release = None
    view = None
    if transport == "plain":
        arrays = []
    elif transport == "inline":
        arrays = consume_inline(data)
    elif transport == "shm":
        view = open_capture(data["capture"]["handle"])
        arrays = [h.data for h in view]
        release = data["capture"]["capture_id"]
    else:  # arrow over HTTP
        cid = data["capture"]["capture_id"]
        g = session.get(f"{base}/v1/activations/{cid}", timeout=600)
        g.raise_for_status()
        view = read_capture_bytes(g.content)
        arrays = [h.data for h in view]
        release = cid
    t_ready = time.perf_counter()
    _read_all(arrays)
    t_read = time.perf_counter()
    nbytes = sum(a.nbytes for a in arrays)
    del arrays
    if view is not None:
        view.close()
    if release:
        session.delete(f"{base}/v1/activations/{release}", timeout=60).raise_for_status()
    return (t_ready - t0) * 1e3, (t_read - t0) * 1e3, nbytes


def memcpy_ms(nbytes: int, reps: int) -> tuple[list[float], list[float]]:
    src = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    dst[:] = 1.0  # pre-fault
    copies, reads = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        t1 = time.perf_counter()
        float(dst.sum(dtype=np.float64))
        copies.append((t1 - t0) * 1e3)
        reads.append((time.perf_counter() - t0) * 1e3)
    return copies, reads


def interleaved(session, base, transports, post_path, body, runs, label) -> dict[str, dict[str, list]]:
    out = {t: {"ready": [], "read": [], "bytes": []} for t in transports}
    for t in transports:  # warm-up: segment creation, first-request costs
        fetch(session, base, t, post_path, body)
    for i in range(runs):
        k = i % len(transports)
        for t in transports[k:] + transports[:k]:
            progress(f"transport_e2e: {label} run {i + 1}/{runs} {t}")
            ready, read, nbytes = fetch(session, base, t, post_path, body)
            out[t]["ready"].append(ready)
            out[t]["read"].append(read)
            out[t]["bytes"].append(nbytes)
    return out


# --- part 1: synthetic captures, delivery only --------------------------------------------------
def bench_synthetic(sizes: list[int], runs: int, inline_cap: int) -> dict:
    progress(f"transport_e2e: building synthetic captures of {sizes} MiB in a server process")
    rows = []
    with SyntheticServer(sizes) as srv, requests.Session() as s:
        shapes = requests.get(srv.base_url + "/bench/sizes", timeout=10).json()
        for mib in sizes:
            meta = shapes[str(mib)]
            transports = ["shm", "arrow_http"] + (["inline"] if mib <= inline_cap else [])
            r = min(runs, 3) if ("inline" in transports and mib >= 64) else runs  # JSON: seconds per run
            res = interleaved(s, srv.base_url, transports, f"/bench/deliver/{mib}", None, r, f"{mib} MiB synthetic")
            nbytes = meta["bytes"]
            assert all(b == nbytes for t in transports for b in res[t]["bytes"]), "consumer got a different size"
            mc, mr = memcpy_ms(nbytes, max(runs, 5))
            row = {
                "payload_mib": nbytes / MiB, "hooks": meta["hooks"], "rows": meta["rows"], "runs": r,
                "memcpy_ms": median(mc), "memcpy_read_ms": median(mr),
                "shm_ms": median(res["shm"]["ready"]), "shm_read_ms": median(res["shm"]["read"]),
                "arrow_http_ms": median(res["arrow_http"]["ready"]),
                "arrow_http_read_ms": median(res["arrow_http"]["read"]),
                "inline_json_ms": median(res["inline"]["ready"]) if "inline" in res else None,
                "inline_json_read_ms": median(res["inline"]["read"]) if "inline" in res else None,
                "samples_ms": {t: res[t]["ready"] for t in transports},
            }
            for key in ("memcpy", "shm", "arrow_http", "inline_json"):
                ms = row.get(f"{key}_ms")
                row[f"{key}_gbps"] = nbytes / (ms / 1e3) / 1e9 if ms else None
            rows.append(row)
    return {
        "description": (f"Synthetic: the real control app delivers a prepared float32 capture (d_model {D_MODEL}, "
                        f"residual/attention/MLP hooks, 1 prefill + {DECODE_STEPS} decode steps); "
                        f"inline JSON only up to {inline_cap} MiB. Times: request sent -> numpy arrays in the "
                        "consumer, median."),
        "rows": rows,
    }


# --- part 2: the default model behind a real server --------------------------------------------
def _hooks(n: int, n_layers: int) -> list[dict]:
    out = []
    for comp in COMPONENTS:
        for layer in range(n_layers):
            out.append({"layer_name": f"model.layers.{layer}", "component": comp, "hook_id": f"{comp}_{layer}"})
    return out[:n]


def _prompt_tokens(session, base: str, content: str) -> int:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0}
    r = session.post(base + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return int(r.json()["usage"]["prompt_tokens"])


def bench_default_model(sizes: list[int], runs: int) -> dict:
    progress("transport_e2e: starting a server with the default model (SmolLM2-135M)")
    rows = []
    with ServerProcess(str(default_model_path()), extra=["--capture-budget", "4G"]) as srv, requests.Session() as s:
        info = s.get(srv.base_url + "/v1/models", timeout=10).json()["data"][0]
        n_layers, d_model = int(info["n_layers"]), int(info["d_model"])
        max_hooks = n_layers * len(COMPONENTS)
        base_text = "Hi"
        t0 = _prompt_tokens(s, srv.base_url, base_text)
        per_hook_row = d_model * 4
        for mib in sizes:
            target = mib * MiB
            hooks = max(1, min(max_hooks, round(target / ((t0 + 1) * per_hook_row))))
            rows_needed = max(t0 + 1, round(target / (hooks * per_hook_row)))
            content = base_text
            for _ in range(3):  # " the" is one token here; correct the count with the server's own tokenizer
                have = _prompt_tokens(s, srv.base_url, content)
                want = rows_needed - 1
                if have == want:
                    break
                extra = max(0, content.count(" the") + (want - have))
                content = base_text + " the" * extra
            prompt_tokens = _prompt_tokens(s, srv.base_url, content)
            body = orjson.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1,
                                 "temperature": 0, "activation_hooks": _hooks(hooks, n_layers)})
            plain = orjson.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1,
                                  "temperature": 0})
            res = {}
            # "plain" goes through /v1/chat/completions; the others through /with_activations.
            transports = ["plain", "shm", "arrow_http", "inline"]
            for t in transports:
                res[t] = {"ready": [], "read": [], "bytes": []}
            for t in transports:  # warm-up
                fetch(s, srv.base_url, t, _path(t), plain if t == "plain" else body)
            for i in range(runs):
                k = i % len(transports)
                for t in transports[k:] + transports[:k]:
                    progress(f"transport_e2e: default model ~{mib} MiB run {i + 1}/{runs} {t}")
                    ready, read, nbytes = fetch(s, srv.base_url, t, _path(t), plain if t == "plain" else body)
                    res[t]["ready"].append(ready)
                    res[t]["read"].append(read)
                    res[t]["bytes"].append(nbytes)
            nbytes = res["shm"]["bytes"][0]
            mc, _ = memcpy_ms(nbytes, 5)
            rows.append({
                "target_mib": mib, "payload_mib": nbytes / MiB, "prompt_tokens": prompt_tokens, "hooks": hooks,
                "runs": runs, "memcpy_ms": median(mc),
                "plain_ms": median(res["plain"]["ready"]), "shm_ms": median(res["shm"]["ready"]),
                "shm_read_ms": median(res["shm"]["read"]), "arrow_http_ms": median(res["arrow_http"]["ready"]),
                "inline_json_ms": median(res["inline"]["ready"]), "inline_json_read_ms": median(res["inline"]["read"]),
                "samples_ms": {t: res[t]["ready"] for t in transports},
            })
    return {
        "description": ("Default model (SmolLM2-135M, float32, 30 layers): one `/with_activations` request with "
                        "max_tokens 1 (prefill + the final token's step), hooks = residual, then attention, then MLP "
                        "outputs layer by layer; 'plain' is the same chat without activations. Median ms, request "
                        "sent -> numpy arrays in the consumer."),
        "model": info,
        "rows": rows,
    }


def _path(transport: str) -> str:
    return "/v1/chat/completions" if transport == "plain" else "/v1/chat/completions/with_activations"


def main(argv: list[str] | None = None) -> dict | None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--serve-synthetic":
        serve_synthetic(int(argv[1]), argv[2], [int(x) for x in argv[3:]])
        return None
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="synthetic payloads in MiB")
    ap.add_argument("--model-sizes", type=int, nargs="*", default=None,
                    help="payloads in MiB through the default model (none: skip that part)")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--inline-cap", type=int, default=INLINE_CAP_MIB, help="largest payload sent as inline JSON (MiB)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sizes = args.sizes or ([1, 16, 64] if args.quick else [1, 4, 16, 64, 256])
    model_sizes = args.model_sizes if args.model_sizes is not None else ([1, 16] if args.quick else [1, 16, 64])
    runs = args.runs or (3 if args.quick else 5)

    result: dict = {"benchmark": "transport_e2e", "machine": machine_info(), "quick": args.quick}
    result["synthetic"] = bench_synthetic(sizes, runs, args.inline_cap)
    if model_sizes:
        result["default_model"] = bench_default_model(model_sizes, runs)

    print("\ntransport_e2e, synthetic (delivery only): median ms until the consumer holds numpy arrays")
    print_table(["MiB", "memcpy", "shm", "shm+read", "Arrow/HTTP", "JSON", "shm/memcpy", "JSON/shm", "shm GB/s",
                 "JSON GB/s"],
                [[r["payload_mib"], r["memcpy_ms"], r["shm_ms"], r["shm_read_ms"], r["arrow_http_ms"], r["inline_json_ms"],
                  r["shm_ms"] / r["memcpy_ms"], (r["inline_json_ms"] / r["shm_ms"]) if r["inline_json_ms"] else None,
                  r["shm_gbps"], r["inline_json_gbps"]] for r in result["synthetic"]["rows"]])
    if "default_model" in result:
        print("\ntransport_e2e, default model (generation + capture + delivery): median ms")
        print_table(["MiB", "prompt tok", "hooks", "plain chat", "shm", "Arrow/HTTP", "JSON", "JSON-plain",
                     "shm-plain"],
                    [[r["payload_mib"], r["prompt_tokens"], r["hooks"], r["plain_ms"], r["shm_ms"], r["arrow_http_ms"],
                      r["inline_json_ms"], r["inline_json_ms"] - r["plain_ms"], r["shm_ms"] - r["plain_ms"]]
                     for r in result["default_model"]["rows"]])
    path = write_result("transport_e2e", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
