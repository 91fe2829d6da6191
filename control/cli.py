"""`nsbridge`: serve a model, harvest activations to Parquet, or fetch the default model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import engine  # noqa: F401  (OpenBLAS before mlx.core)
from control.security import DEFAULT_MAX_BODY_BYTES


def _size(text: str) -> int:
    """Parse sizes like 512M, 2G, 1048576."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP")
    serve.add_argument("--host", default=os.environ.get("NSBRIDGE_HOST", "127.0.0.1"),
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("NSBRIDGE_PORT", "8080")))
    serve.add_argument("--model", help="model folder, .gguf file or Hugging Face repo id (default: SmolLM2-135M)")
    serve.add_argument("--model-id", help="the id clients see (default: from the path)")
    serve.add_argument("--no-model", action="store_true", help="start without a model; load one with the API")
    serve.add_argument("--api-key", default=os.environ.get("NSBRIDGE_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (env NSBRIDGE_API_KEY)")
    serve.add_argument("--cors-origin", action="append", default=[],
                       help="allow this browser origin (repeatable); CORS is off by default")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="also answer requests whose Host is NAME (repeatable); loopback names and the "
                            "--host address always are. '*' turns the Host check off: dangerous, since any "
                            "web page can then read the server's answers through DNS rebinding")
    serve.add_argument("--max-body-size", type=_size, default=DEFAULT_MAX_BODY_BYTES, metavar="SIZE",
                       help=f"largest request body (e.g. 8M; default {DEFAULT_MAX_BODY_BYTES >> 20}M)")
    serve.add_argument("--allow-model-dir", action="append", default=[], type=Path,
                       help="directory clients may load models from without an API key (repeatable)")
    serve.add_argument("--state-dir", help="where the shared-memory registry lives (default: cache dir)")
    serve.add_argument("--harvest-dir", help="where POST /v1/harvest jobs write (default: $NSBRIDGE_HOME/harvest, "
                       "i.e. ~/.cache/nsbridge/harvest)")
    serve.add_argument("--shm-budget", type=_size, help="total bytes of live captures in /dev/shm (e.g. 2G)")
    serve.add_argument("--shm-ttl", type=float, default=600.0, help="seconds a capture lives unless released")
    serve.add_argument("--capture-budget", type=_size, default=2 << 30,
                       help="largest capture one request may ask for (default 2G)")
    serve.add_argument("--queue-size", type=int, default=64,
                       help="requests in flight (decoding or waiting) before 503 (default 64)")
    serve.add_argument("--max-batch-size", type=int, default=16,
                       help="requests decoding together in one batch (default 16; 1 = one at a time)")
    serve.add_argument("--max-tokens-per-request", type=int, metavar="N",
                       help="refuse requests whose max_tokens is over N (400); default: the context decides")
    serve.add_argument("--max-seconds-per-request", type=float, metavar="S",
                       help="end a generation after S seconds of wall time (finish_reason 'length')")
    serve.add_argument("--log-level", default="info")
    sub.add_parser("fetch-default", help="download and convert the default model into the cache")
    add_harvest_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "harvest":
        return harvest_command(args)

    if args.command == "fetch-default":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from engine.default_model import ensure_default_model

        print(ensure_default_model())
        return 0
    return serve_command(args)


def add_harvest_parser(sub) -> None:
    h = sub.add_parser("harvest", help="capture activations of every token of a corpus into Parquet shards",
                       description="Run the model over each document (JSONL or Parquet records with 'text' or "
                                   "'messages') and write one Parquet row per token: doc_id, position, token_id "
                                   "and one fixed-size-list column per hook, plus DIR/_manifest.json. Rerun the "
                                   "same command to resume an interrupted job.")
    h.add_argument("input", type=Path, help="a .jsonl or .parquet file of documents")
    h.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (new, or the same "
                   "one to resume)")
    h.add_argument("--hook", action="append", required=True, metavar="NAME", dest="hooks",
                   help="a TransformerLens name (blocks.3.hook_resid_post) or layer_name:component "
                        "(model.layers.3:mlp); repeatable; the column is named as written")
    h.add_argument("--model", default="default", help="model folder, .gguf file or Hugging Face repo id "
                   "(default: SmolLM2-135M)")
    h.add_argument("--model-id", help="the model id recorded in the manifest (default: from the path)")
    h.add_argument("--context", type=int, metavar="N", help="tokens per document at most (default: 1024 or the "
                   "model's context length, if smaller); longer documents are an error unless --truncate")
    h.add_argument("--truncate", action="store_true", help="cut documents longer than --context")
    h.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    h.add_argument("--shard-rows", type=int, default=65536, metavar="N",
                   help="rows (tokens) per shard at most; shards hold whole documents (default 65536)")
    h.add_argument("--max-tokens", type=int, metavar="N", help="stop after N tokens (the last document is cut)")
    h.add_argument("--shuffle", type=int, metavar="SEED", help="permute the rows across all shards (for SAE "
                   "training); needs the output's size again in temporary space in DIR while it runs")
    h.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="documents of similar length per forward at most (default 16)")
    h.add_argument("--batch-tokens", type=int, default=4096, metavar="N",
                   help="padded tokens (documents x the longest) per forward at most (default 4096)")
    h.add_argument("--ray", metavar="ADDRESS", help="run the forwards on a Ray cluster (pip install nsbridge[ray]): "
                   "'auto' joins the cluster on this machine or starts a local one; HOST:6379 or ray://HOST:10001 "
                   "a remote one, whose nodes share --out (docs/harvest.md)")
    h.add_argument("--ray-workers", type=int, metavar="N", help="model replicas (Ray actors); default one per node")


def harvest_command(args) -> int:
    from engine.errors import EngineError
    from harvest.inputs import InputError, check_readable
    from harvest.job import HarvestOptions, run_harvest
    from harvest.store import StoreError

    def fail(message: str, code: int = 1) -> int:
        print(f"nsbridge harvest: error: {message}", file=sys.stderr)
        return code

    if args.shard_rows < 1:
        return fail("--shard-rows must be at least 1", 2)
    if args.max_tokens is not None and args.max_tokens < 1:
        return fail("--max-tokens must be at least 1", 2)
    if args.batch_size < 1 or args.batch_tokens < 1:
        return fail("--batch-size and --batch-tokens must be at least 1", 2)
    if args.ray_workers is not None and args.ray_workers < 1:
        return fail("--ray-workers must be at least 1", 2)
    if args.ray is not None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            return fail("--ray needs Ray: pip install 'nsbridge[ray]'", 2)
    try:
        check_readable(args.input)  # before loading the model
        lm = engine.load(args.model, args.model_id).lm
        options = HarvestOptions(hooks=args.hooks, context=args.context, truncate=args.truncate, dtype=args.dtype,
                                 shard_rows=args.shard_rows, max_tokens=args.max_tokens, shuffle=args.shuffle,
                                 batch_size=args.batch_size, batch_tokens=args.batch_tokens)
        manifest = run_harvest(lm, args.input, args.out, options, ray=args.ray, ray_workers=args.ray_workers)
    except (InputError, StoreError, OSError) as exc:  # OSError: e.g. the disk filled up; finished shards stay
        return fail(str(exc))
    except EngineError as exc:
        return fail(exc.message)
    except KeyboardInterrupt:
        return fail("interrupted; the finished shards are kept: run the same command again to resume", 130)
    print(f"{manifest['tokens']} tokens of {manifest['documents']} documents in {len(manifest['shards'])} shards "
          f"in {args.out}", file=sys.stderr)
    return 0


def serve_command(args) -> int:
    import uvicorn

    from control.app import AppConfig, create_app
    from control.errors import HTTPError
    from control.service import ModelService, ServiceConfig
    from engine.blas import BLAS_IN_USE

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("nsbridge")
    log.info("BLAS in use: %s", BLAS_IN_USE)
    config = AppConfig(
        service=ServiceConfig(allowed_model_dirs=args.allow_model_dir, allow_any_model=bool(args.api_key),
                              capture_budget_bytes=args.capture_budget, queue_size=args.queue_size,
                              max_batch_size=args.max_batch_size,
                              max_tokens_per_request=args.max_tokens_per_request,
                              max_seconds_per_request=args.max_seconds_per_request),
        api_key=args.api_key, cors_origins=args.cors_origin, allowed_hosts=args.allowed_host,
        bound_host=args.host, max_body_bytes=args.max_body_size, shm_ttl_s=args.shm_ttl,
        shm_budget_bytes=args.shm_budget, state_dir=args.state_dir, harvest_dir=args.harvest_dir,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", args.host)
    if args.host in ("0.0.0.0", "::") and not args.allowed_host:
        log.warning("listening on %s, but only loopback Host names are served: start with --allowed-host NAME "
                    "for each name or address clients use to reach this machine", args.host)
    service = ModelService(config.service)
    if not args.no_model:
        try:
            service.load(args.model, args.model_id)
        except HTTPError as exc:
            log.error("cannot load the model: %s", exc.message)
            return 2
    app = create_app(config, service)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
