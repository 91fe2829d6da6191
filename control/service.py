"""The model behind the server: one loaded model, one generation at a time, requests in order.

Everything that touches MLX runs on a single worker thread, off the event loop. Requests wait
in a bounded queue; a full queue is refused with `Busy` (503) rather than growing without end.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.capture import Capture
from engine.default_model import MODEL_ID as DEFAULT_MODEL_ID
from engine.default_model import default_model_dir, ensure_default_model
from engine.errors import Busy, CaptureTooLarge, InvalidRequest, ModelPathForbidden, NoModelLoaded
from engine.generate import Generation, SamplingParams, TokenEvent, generate
from engine.hooks import CaptureOptions, HookTarget, estimate_bytes, resolve_hooks
from engine.model import LoadedModel, load_model
from engine.progress import Progress
from engine.records import CaptureResult

log = logging.getLogger("nsbridge.control")


@dataclass
class ServiceConfig:
    allowed_model_dirs: list[Path] = field(default_factory=list)
    allow_any_model: bool = False  # set when clients must present an API key
    capture_budget_bytes: int = 2 << 30  # largest capture one request may ask for
    queue_size: int = 16


@dataclass
class ChatJob:
    """A validated chat request, ready for the worker."""

    prompt: list[int]
    params: SamplingParams
    targets: list[HookTarget] | None  # None: no capture
    options: CaptureOptions
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class ChatResult:
    generation: Generation
    capture: CaptureResult | None


class ModelService:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.lm: LoadedModel | None = None
        self.registered_hooks: list[dict] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-worker")
        self._pending = 0
        self._pending_lock = threading.Lock()

    # --- the queue ------------------------------------------------------------------------
    async def run(self, fn: Callable, *args) -> Any:
        """Run fn on the worker thread after the requests before it; refuse when the queue is full."""
        with self._pending_lock:
            self.check_room()
            self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            with self._pending_lock:
                self._pending -= 1

    def check_room(self) -> None:
        """Refuse with `Busy` when the queue is full. Streams call it before their response starts,
        while a 503 can still be sent (a slot taken in between still gets an SSE error event)."""
        if self._pending >= self.config.queue_size:
            raise Busy(f"the server is busy: {self._pending} requests are queued; retry shortly")

    @property
    def queued(self) -> int:
        return self._pending

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- models ---------------------------------------------------------------------------
    def require_model(self) -> LoadedModel:
        if self.lm is None:
            raise NoModelLoaded("no model is loaded: POST /v1/models/load with {\"model_path\": ...} first")
        return self.lm

    def check_model_path(self, model_path: str) -> None:
        """Without an API key, clients may only load models from the configured directories."""
        if self.config.allow_any_model or not isinstance(model_path, str):
            return
        if model_path in ("default", DEFAULT_MODEL_ID):
            return
        # Decide on the resolved path before touching it, so clients learn nothing about other paths.
        resolved = Path(model_path).expanduser().resolve()
        if any(resolved.is_relative_to(d.resolve()) for d in self.allowed_dirs()):
            return
        raise ModelPathForbidden(
            f"loading {model_path!r} is not allowed: models must live under "
            f"{', '.join(str(d) for d in self.allowed_dirs())} "
            "(start the server with --allow-model-dir, or set an API key to allow any path)",
            "model_path",
        )

    def allowed_dirs(self) -> list[Path]:
        return [*self.config.allowed_model_dirs, default_model_dir().parent]

    def load(self, model_path: str | None, model_id: str | None = None) -> LoadedModel:
        """Load a model on the worker thread; it replaces the current one."""
        if model_path in (None, "default", DEFAULT_MODEL_ID):
            model_path = str(ensure_default_model())
        if Path(model_path).expanduser().resolve() == default_model_dir().resolve():
            model_id = model_id or DEFAULT_MODEL_ID  # the same id however the default model is named
        log.info("loading model %s", model_path)
        lm = load_model(model_path, model_id, progress=Progress("converting"))
        self.lm = lm  # the old model served until the new one loaded, so a failed load changes nothing
        self.registered_hooks = []  # hooks name layers of a specific model
        return lm

    # --- requests -------------------------------------------------------------------------
    def prepare_chat(self, body: dict, hooks: list | None, options: CaptureOptions) -> ChatJob:
        lm = self.require_model()
        params = SamplingParams(
            # Not `or`: an explicit 0 must reach validation (422), not become the default.
            max_tokens=_field(body, "max_tokens", _field(body, "max_completion_tokens", 256)),
            temperature=_field(body, "temperature", 1.0),
            top_p=_field(body, "top_p", 1.0),
            top_k=_field(body, "top_k", 0),
            seed=_field(body, "seed", None),
            stop=_field(body, "stop", None) or [],
        ).validate()
        if _field(body, "n", 1) != 1:
            raise InvalidRequest("only n = 1 is supported", "n")
        prompt = lm.chat_prompt(body.get("messages"))
        targets = resolve_hooks(lm, hooks) if hooks is not None else None
        if targets:
            max_tokens = min(params.max_tokens, max(lm.info.context_length - len(prompt), 0))
            size = estimate_bytes(lm, targets, len(prompt), max_tokens, options)
            if size > self.config.capture_budget_bytes:
                raise CaptureTooLarge(
                    f"this capture could need {size / 2**20:.1f} MiB, over the per-request budget of "
                    f"{self.config.capture_budget_bytes / 2**20:.0f} MiB; capture fewer hooks, lower max_tokens, "
                    "or set activation_positions to 'last' or activation_dtype to 'float16'",
                    "activation_hooks",
                )
        return ChatJob(prompt=prompt, params=params, targets=targets or None, options=options)

    def run_chat(self, job: ChatJob, on_event: Callable[[TokenEvent, Capture | None], None] | None = None) -> ChatResult:
        """Generate on the worker thread. Stops early when the job is cancelled (client gone)."""
        lm = self.require_model()
        capture = Capture(lm, job.targets, job.options) if job.targets else None
        generation = Generation(prompt_tokens=len(job.prompt), token_ids=list(job.prompt))
        events = generate(lm, job.prompt, job.params, capture=capture, result=generation)
        try:
            for event in events:
                if on_event is not None:
                    on_event(event, capture)
                if job.cancelled.is_set():
                    generation.finish_reason = "cancelled"
                    return ChatResult(generation, None)
        finally:
            events.close()  # uninstalls the capture even when we stop early
        result = None
        if capture is not None:
            tokenizer = lm.tokenizer
            result = CaptureResult(
                capture_id="cap_" + secrets.token_hex(8),
                model_id=lm.info.model_id,
                token_ids=generation.token_ids,
                tokens=[tokenizer.decode([t]) for t in generation.token_ids],
                prompt_tokens=generation.prompt_tokens,
                hooks=capture.records,
            )
        return ChatResult(generation, result)


def _field(body: dict, name: str, default):
    value = body.get(name, default)
    return default if value is None else value
