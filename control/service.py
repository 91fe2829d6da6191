"""The model behind the server: one loaded model, chat requests decoding together in a batch.

Everything that touches MLX runs on a single worker thread, off the event loop. Its loop:
take what arrived; run exclusive work (loading a model, attribution, a harvest batch) between
decode steps; admit waiting chat requests into the running batch (engine/batch.py) while the
batch has room (`max_batch_size`, and the capture budget counted across the batch); run one
decode step for every request in it. A model whose cache cannot be batched runs each request
alone, in order. Requests in flight are bounded: past `queue_size`, `Busy` (503) rather than
a queue growing without end. Planning a request (validation, chat template, tokenizing, hook
resolution) touches no MLX array and runs in Starlette's thread pool, so a huge prompt never
blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import engine
from control.errors import Busy, InvalidRequest, ModelPathForbidden, NoModelLoaded, from_engine
from control.schemas import logprob_values, sampling_values
from engine.batch import Batch, batchable, can_join
from engine.default_model import MODEL_ID as DEFAULT_MODEL_ID
from engine.default_model import default_model_dir, ensure_default_model
from engine.errors import EngineError
from engine.interventions import Sources
from engine.params import CaptureOptions, HookSpec, LogprobOptions, SamplingParams, parse
from engine.progress import Progress

log = logging.getLogger("nsbridge.control")

# Engine argument -> request field, for error messages (`hooks[2]` is `activation_hooks[2]`).
CHAT_FIELDS = {"hooks": "activation_hooks", "positions": "activation_positions", "dtype": "activation_dtype",
               "logprobs.token_ids": "logprob_token_ids"}


@dataclass
class ServiceConfig:
    allowed_model_dirs: list[Path] = field(default_factory=list)
    allow_any_model: bool = False  # set when clients must present an API key
    capture_budget_bytes: int = 2 << 30  # largest capture one request may ask for, and all of a batch's together
    queue_size: int = 64  # requests in flight (decoding or waiting) before 503
    max_batch_size: int = 16  # requests decoding together
    max_tokens_per_request: int | None = None  # server-wide cap on max_tokens
    max_seconds_per_request: float | None = None  # server-wide cap on a generation's wall time

    def limits(self) -> dict:
        return {"max_tokens_per_request": self.max_tokens_per_request,
                "max_seconds_per_request": self.max_seconds_per_request,
                "capture_budget_bytes": self.capture_budget_bytes, "queue_size": self.queue_size,
                "max_batch_size": self.max_batch_size}


@dataclass
class ChatJob:
    """A planned chat request, ready for the worker."""

    plan: Any  # engine GenerationPlan
    baseline: Any = None  # the same plan without interventions or hooks, when the request asks for it
    baseline_result: Any = None  # its Completion, once run
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Call:
    """Exclusive work for the MLX thread, run between decode steps."""

    fn: Callable
    args: tuple
    done: Future


@dataclass
class _Chat:
    """A chat job on its way through the batch: its plan, then its baseline's."""

    job: ChatJob
    on_event: Callable[[Any], None] | None
    done: Future
    deadline: float | None = None
    result: Any = None  # the plan's Completion, while its baseline runs

    @property
    def plan(self):
        return self.job.plan if self.result is None else self.job.baseline


class ModelService:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.model: engine.Model | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._inbox: list[_Call | _Chat] = []
        self._wake = threading.Condition()
        self._closed = False
        self._waiting: deque[_Chat] = deque()  # on the worker thread only, as are the batch's
        self._batch: Batch | None = None
        self._batchable: tuple[Any, bool] | None = None  # (model, whether its cache batches)
        self._worker = threading.Thread(target=self._work, name="mlx-worker", daemon=True)
        self._worker.start()

    # --- the queue ------------------------------------------------------------------------
    async def run(self, fn: Callable, *args) -> Any:
        """Run fn on the worker thread, alone (between decode steps); refuse when the queue is full."""
        return await self._submit(lambda done: _Call(fn, args, done))

    async def chat(self, job: ChatJob, on_event: Callable[[Any], None] | None = None):
        """Generate a chat job in the batch: the engine's Completion, or None when the job was
        cancelled (client gone). `on_event` gets each TokenEvent on the worker thread. A baseline
        runs after it (its Completion in `job.baseline_result`), under the same time limit."""
        return await self._submit(lambda done: _Chat(job, on_event, done))

    async def _submit(self, make: Callable[[Future], _Call | _Chat]) -> Any:
        with self._pending_lock:
            self.check_room()
            self._pending += 1
        try:
            done: Future = Future()
            with self._wake:
                if self._closed:
                    raise RuntimeError("the server is shutting down")
                self._inbox.append(make(done))
                self._wake.notify()
            return await asyncio.wrap_future(done)
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
        """Requests in flight: decoding, waiting, or exclusive work."""
        return self._pending

    @property
    def decoding(self) -> int:
        """Requests in the running batch now."""
        return len(self._batch) if self._batch is not None else 0

    def shutdown(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    # --- the worker thread --------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._closed or self._waiting or self._batch):
                    self._wake.wait()
                if self._closed:
                    break
                inbox, self._inbox = self._inbox, []
            for item in inbox:
                if isinstance(item, _Call):
                    _settle(item.done, item.fn, *item.args)
                else:
                    self._waiting.append(item)
            try:
                self._admit()
                if self._batch:
                    self._batch.step()
            except Exception as exc:  # a bug: the requests in the batch fail with it, the worker goes on
                log.exception("the batch failed")
                if self._batch:
                    self._batch.cancel_all(exc)
        stopped = RuntimeError("the server is shutting down")
        if self._batch:
            self._batch.cancel_all(stopped)
        for item in [*self._waiting, *self._inbox]:
            _resolve(item.done, error=stopped)

    def _admit(self) -> None:
        """Move waiting chats into the batch, in order, while it has room for them; those
        admitted together run their prompts in one forward (as many as `can_join` allows)."""
        joining: list[_Chat] = []
        while self._waiting:
            chat = self._waiting[0]
            lm = chat.plan.lm
            if chat.job.cancelled.is_set() or chat.done.cancelled():
                self._waiting.popleft()
                _resolve(chat.done, None)
                continue
            if not self._batch and not joining:  # empty: it may start over on another model
                self._batch = Batch(lm)
            if self._batch.lm is not lm:
                break  # the batch drains first
            if not self._can_batch(lm):
                if joining:
                    break
                self._waiting.popleft()
                self._start_clock(chat)
                self._run_alone(chat)
                continue
            plans = [row.gen.plan for row in self._batch.rows] + [c.plan for c in joining]
            used = sum(p.capture_bytes for p in plans)
            if len(plans) >= self.config.max_batch_size or \
                    (plans and used + chat.plan.capture_bytes > self.config.capture_budget_bytes) or \
                    not can_join([len(c.plan.prompt) for c in joining], len(chat.plan.prompt)):
                break
            self._start_clock(chat)
            joining.append(self._waiting.popleft())
        if joining:
            self._batch.join([(c.plan, (c.result is None and c.on_event) or _ignore,
                               lambda result, error, c=c: self._plan_done(c, result, error),
                               lambda c=c: c.job.cancelled.is_set() or c.done.cancelled(), c.deadline)
                              for c in joining])

    def _start_clock(self, chat: _Chat) -> None:
        """The server's time limit counts from when a chat starts generating (its baseline shares it)."""
        if chat.deadline is None and self.config.max_seconds_per_request is not None:
            chat.deadline = time.monotonic() + self.config.max_seconds_per_request

    def _plan_done(self, chat: _Chat, result, error: BaseException | None) -> None:
        if error is not None:
            _resolve(chat.done, error=error)
        elif result is None or chat.job.baseline is None:
            _resolve(chat.done, result)
        elif chat.result is None:  # the plan is done: its baseline next, before anything else
            chat.result = result
            self._waiting.appendleft(chat)
        else:
            chat.job.baseline_result = result
            _resolve(chat.done, chat.result)

    def _can_batch(self, lm) -> bool:
        if self._batchable is None or self._batchable[0] is not lm:
            self._batchable = (lm, batchable(lm))
        return self._batchable[1]

    def _run_alone(self, chat: _Chat) -> None:
        """A chat on a model that cannot batch: generated to the end now, the batch waiting."""
        for plan, on_event in ((chat.job.plan, chat.on_event), (chat.job.baseline, None)):
            if plan is None:
                break
            try:
                result = self._run_plan(chat.job, plan, on_event, chat.deadline)
            except Exception as exc:
                _resolve(chat.done, error=exc)
                return
            if result is None:
                _resolve(chat.done, None)
                return
            if plan is chat.job.plan:
                chat.result = result
            else:
                chat.job.baseline_result = result
        _resolve(chat.done, chat.result)

    # --- models ---------------------------------------------------------------------------
    def require_model(self) -> engine.Model:
        if self.model is None:
            raise NoModelLoaded("no model is loaded: POST /v1/models/load with {\"model_path\": ...} first")
        return self.model

    def may_read(self, path: str) -> bool:
        """Whether a client may have the server read `path`: anywhere with an API key, else only
        under the allowed directories. Decided on the resolved path before touching it, so clients
        learn nothing about other paths."""
        if self.config.allow_any_model:
            return True
        resolved = Path(path).expanduser().resolve()
        return any(resolved.is_relative_to(d.resolve()) for d in self.allowed_dirs())

    def check_model_path(self, model_path: str) -> None:
        """Without an API key, clients may only load models from the configured directories."""
        if model_path in ("default", DEFAULT_MODEL_ID) or self.may_read(model_path):
            return
        raise ModelPathForbidden(
            f"loading {model_path!r} is not allowed: models must live under "
            f"{', '.join(str(d) for d in self.allowed_dirs())} "
            "(start the server with --allow-model-dir, or set an API key to allow any path)",
            "model_path",
        )

    def allowed_dirs(self) -> list[Path]:
        return [*self.config.allowed_model_dirs, default_model_dir().parent]

    def load(self, model_path: str | None, model_id: str | None = None) -> engine.Model:
        """Load a model on the worker thread; it replaces the current one (and its registered hooks)."""
        if model_path in (None, "default", DEFAULT_MODEL_ID):
            model_path = str(ensure_default_model())
        if Path(model_path).expanduser().resolve() == default_model_dir().resolve():
            model_id = model_id or DEFAULT_MODEL_ID  # the same id however the default model is named
        log.info("loading model %s", model_path)
        try:
            model = engine.load(model_path, model_id, progress=Progress("converting"))
        except EngineError as exc:
            raise from_engine(exc) from exc
        self.model = model  # the old model served until the new one loaded, so a failed load changes nothing
        return model

    # --- hooks registered for later requests ---------------------------------------------
    def set_hooks(self, specs: list[HookSpec]) -> None:
        """Replace the registered hooks with `specs`, all or none."""
        model = self.require_model()
        previous = model.activation_hooks
        model.clear_activation_hooks()
        try:
            for i, spec in enumerate(specs):
                try:
                    model.register_activation_hook(**spec.model_dump(exclude_none=True))
                except EngineError as exc:
                    raise from_engine(exc, prefix=f"hooks[{i}]") from exc
        except Exception:
            model.clear_activation_hooks()
            for spec in previous:
                model.register_activation_hook(**spec.model_dump(exclude_none=True))
            raise

    # --- requests -------------------------------------------------------------------------
    def prepare_chat(self, body: Any, with_activations: bool, sources: Sources | None = None) -> ChatJob:
        """Plan a validated chat body (tokenize, resolve hooks and interventions, check sizes).
        Touches no MLX array. `sources` finds the captures that patch interventions copy from."""
        model = self.require_model()
        try:
            sampling = parse(SamplingParams, **sampling_values(body))
            # Each field's own rules were checked with the body; this adds the rules between them
            # (top_logprobs needs logprobs), whose errors name the request's field.
            logprobs = parse(LogprobOptions, **logprob_values(body))
            cap = self.config.max_tokens_per_request
            if cap is not None and sampling.max_tokens > cap:
                raise InvalidRequest(f"'max_tokens' is {sampling.max_tokens} but this server allows at most {cap} "
                                     "tokens per request", "max_tokens")
            hooks = capture = None
            if with_activations:
                hooks = body.activation_hooks or model.activation_hooks
                if not hooks:
                    raise InvalidRequest("no activation hooks: send 'activation_hooks' or register them with "
                                         "POST /v1/activations/hooks", "activation_hooks")
                capture = parse(CaptureOptions, positions=body.activation_positions, dtype=body.activation_dtype)
            if body.baseline and sampling.seed is None and sampling.temperature > 0:
                # The baseline must sample exactly as the intervened run does.
                sampling = sampling.model_copy(update={"seed": secrets.randbits(63)})
            messages = None if body.messages is None else [m.model_dump() for m in body.messages]
            plan = model.plan(messages=messages, prompt=body.prompt, sampling=sampling, hooks=hooks,
                              capture=capture or CaptureOptions(), capture_budget_bytes=self.config.capture_budget_bytes,
                              logprobs=logprobs, interventions=body.interventions, sources=sources)
        except EngineError as exc:
            raise from_engine(exc, CHAT_FIELDS) from exc
        baseline = replace(plan, interventions=(), targets=None, capture_bytes=0) if body.baseline else None
        return ChatJob(plan, baseline)

    def prepare_attribution(self, body: Any):
        """Plan a validated attribution body (tokenize both runs, resolve the sites). No MLX work."""
        model = self.require_model()
        try:
            return model.plan_attribution(clean=body.clean.engine_value(), corrupted=body.corrupted.engine_value(),
                                          metric=body.metric, sites=body.sites, method=body.method,
                                          verify_top=body.verify_top)
        except EngineError as exc:
            raise from_engine(exc) from exc

    def run_attribution(self, plan: Any) -> dict:
        """Run a planned attribution on the worker thread (engine.attribution.run_attribution); under
        the server's time limit, verifying patches not started in time are skipped."""
        limit = self.config.max_seconds_per_request
        return self.require_model().run_attribution(plan, deadline=None if limit is None else time.monotonic() + limit)

    def _run_plan(self, job: ChatJob, plan: Any, on_event: Callable[[Any], None] | None, deadline: float | None):
        events = self.require_model().run(plan, deadline=deadline)
        try:
            for event in events:
                if on_event is not None:
                    on_event(event)
                if event.result is not None:
                    return event.result
                if job.cancelled.is_set():
                    return None
        finally:
            events.close()  # uninstalls the capture even when we stop early
        return None


def _ignore(event) -> None:
    pass


def _settle(done: Future, fn: Callable, *args) -> None:
    if done.cancelled():  # nobody waits for it any more
        return
    try:
        result = fn(*args)
    except BaseException as exc:  # the caller's to handle; the worker goes on
        _resolve(done, error=exc)
    else:
        _resolve(done, result)


def _resolve(done: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Settle a future whose waiter may have given up (cancelled it) meanwhile."""
    try:
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)
    except InvalidStateError:
        pass
