"""Harvest jobs over HTTP: `POST /v1/harvest` starts one, `GET /v1/harvest/{job_id}` reports its
progress, `DELETE /v1/harvest/{job_id}` (or `POST .../cancel`, for SqueakJS) stops it.

A job is `harvest.job.run_harvest` on a thread of its own (reading the input, tokenizing and
writing Parquet stay off the event loop and off the model's worker); every forward, one batch
at a time, goes through `service.run`, the server's exclusive MLX queue, so chat requests
interleave with a long harvest. Clients cannot name where a job writes: its shards go to a
server-owned directory (`<harvest dir>/<job_id>/`, reported in the status). An input file must
lie where clients may load models from (--allow-model-dir, or anywhere with an API key), the
same policy as `POST /v1/models/load`; documents may instead come inline in the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.convertors import register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from control.delivery import IdConvertor
from control.errors import Busy, HTTPError, NotFound, from_engine
from control.schemas import HarvestRequest, parse_body
from control.service import ModelService
from engine import paths
from engine.errors import EngineError
from engine.harvest import Harvester
from harvest.inputs import InputError, check_readable
from harvest.job import HarvestOptions, run_harvest
from harvest.store import StoreError

JOB_ID_PATTERN = "^harvest-[0-9a-f]{16}$"  # Harvests.harvest makes them: "harvest-" + 8 random bytes in hex
register_url_convertor("job_id", IdConvertor(JOB_ID_PATTERN))

log = logging.getLogger("nsbridge.harvest")

# HarvestOptions' fields that a request carries under the same names (null: the default).
_OPTION_FIELDS = [f for f in HarvestOptions.__dataclass_fields__ if f != "hooks"]


class InputForbidden(HTTPError):
    status = 403
    type = "permission_error"
    code = "input_path_forbidden"


class Cancelled(Exception):
    """The client cancelled the job; the finished shards stay."""


def harvest_root(configured: str | Path | None) -> Path:
    """Where jobs write: the configured directory, else $NSBRIDGE_HOME/harvest."""
    return Path(configured) if configured is not None else paths.home() / "harvest"


@dataclass
class HarvestJob:
    job_id: str
    out: Path
    input_path: Path
    options: HarvestOptions
    state: str = "running"  # running | cancelling | completed | failed | cancelled
    figures: dict = field(default_factory=dict)
    error: str | None = None
    manifest: dict | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> dict:
        done = self.manifest
        return {
            "id": self.job_id, "object": "harvest", "state": self.state, "out": str(self.out),
            "created": int(self.created), "finished": None if self.finished is None else int(self.finished),
            "hooks": self.options.hooks,
            "progress": {"tokens_done": 0, "tokens_total": None, "tokens_per_s": 0.0, "bytes_written": 0,
                         "eta_s": None, **self.figures},
            "error": self.error,
            "result": None if done is None else {
                "tokens": done["tokens"], "documents": done["documents"], "shards": len(done["shards"]),
                "bytes": sum(s["bytes"] for s in done["shards"]), "manifest": str(self.out / "_manifest.json")},
        }


class Harvests:
    """The server's harvest jobs (kept for the life of the process) and their handlers."""

    def __init__(self, service: ModelService, root: Path):
        self.service, self.root = service, root
        self.jobs: dict[str, HarvestJob] = {}

    async def harvest(self, request: Request) -> Response:
        """Start a harvest job: activations of every token of the documents into Parquet shards in
        a server-owned directory. Answers 202 with the job's status."""
        body = parse_body(await request.body(), HarvestRequest)
        model = self.service.require_model()
        job_id = "harvest-" + secrets.token_hex(8)
        options = HarvestOptions(hooks=body.hooks, **{k: getattr(body, k) for k in _OPTION_FIELDS
                                                      if getattr(body, k) is not None})
        input_path = await run_in_threadpool(self._input, body, job_id)
        try:  # hooks, context and dtype answered now, not as a failed job
            Harvester(model.lm, options.hooks, context=options.context or min(1024, model.lm.info.context_length),
                      dtype=options.dtype)
        except EngineError as exc:
            raise from_engine(exc) from exc
        job = HarvestJob(job_id, self.root / job_id, input_path, options)
        self.jobs[job_id] = job
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, args=(job, model.lm, loop), name=job_id, daemon=True).start()
        return JSONResponse(job.describe(), status_code=202)

    async def list_harvests(self, request: Request) -> Response:
        """Every harvest job since the server started."""
        return JSONResponse({"object": "list", "data": [j.describe() for j in self.jobs.values()]})

    async def harvest_status(self, request: Request) -> Response:
        """A job's state and progress: tokens done and total, tokens/s, bytes written, ETA."""
        return JSONResponse(self._job(request).describe())

    async def cancel_harvest(self, request: Request) -> Response:
        """Stop a job after its current forward (POST twin for SqueakJS, which cannot send DELETE);
        the finished shards stay in its directory."""
        job = self._job(request)
        if job.state == "running":
            job.state = "cancelling"
            job.cancel.set()
        return JSONResponse(job.describe())

    def _job(self, request: Request) -> HarvestJob:
        job_id = request.path_params["job_id"]
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no harvest job {job_id!r}; GET /v1/harvest lists them")
        return job

    def _input(self, body: HarvestRequest, job_id: str) -> Path:
        """The job's input file: the client's path, if the server lets clients read it, or the
        inline documents written to a file of the server's."""
        if (body.input_path is None) == (body.documents is None):
            raise HTTPError("give exactly one of 'input_path' (a .jsonl or .parquet file on the server) or "
                            "'documents' (a list of {\"text\"} or {\"messages\"} objects)", "input_path")
        if body.documents is not None:
            path = self.root / "_inputs" / f"{job_id}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                for doc in body.documents:
                    f.write(json.dumps(doc.model_dump(exclude_none=True)) + "\n")
            return path
        if not self.service.may_read(body.input_path):
            raise InputForbidden(f"reading {body.input_path!r} is not allowed: input files must live under "
                                 f"{', '.join(str(d) for d in self.service.allowed_dirs())} (start the server "
                                 "with --allow-model-dir, set an API key to allow any path, or send 'documents')",
                                 "input_path")
        resolved = Path(body.input_path).expanduser().resolve()
        try:
            check_readable(resolved)
        except InputError as exc:
            raise HTTPError(str(exc), "input_path") from None
        return resolved

    def _run(self, job: HarvestJob, lm, loop: asyncio.AbstractEventLoop) -> None:
        def call(fn, *args):
            """fn(*args) on the model's worker, after the requests queued before it."""
            while True:
                if job.cancel.is_set():
                    raise Cancelled
                future = asyncio.run_coroutine_threadsafe(self.service.run(fn, *args), loop)
                try:
                    return future.result()
                except Busy:  # a full queue: wait for room rather than fail a long job
                    time.sleep(0.2)

        try:
            job.manifest = run_harvest(lm, job.input_path, job.out, job.options, stream=None, call=call,
                                       on_progress=job.figures.update)
            job.state = "completed"
        except Cancelled:
            job.state = "cancelled"
        except (InputError, StoreError, OSError, ValueError) as exc:
            job.state, job.error = "failed", str(exc)
        except EngineError as exc:
            job.state, job.error = "failed", exc.message
        except Exception as exc:  # noqa: BLE001  (reported in the status; the server goes on)
            log.exception("harvest %s failed", job.job_id)
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.finished = time.time()
