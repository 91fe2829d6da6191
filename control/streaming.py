"""Server-Sent Events for a chat request: a role chunk, one chunk per token, then [DONE].

Each token's chunk carries the log-probabilities of that token when asked (one entry per
token, even when its chunk has no text: it may be held back, or be the end token). With inline
activations, each token's chunk carries the activations of the forward step that produced it
(the last one also those of the final step). With shared memory, the final chunk
carries the capture's handle once the capture is written.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, AsyncIterator

import orjson
from starlette.requests import Request

from control import openai_format
from control.delivery import Delivery, shm_entries
from control.errors import HTTPError, error_body, from_engine, to_dict
from control.inline import entries_for_steps
from control.service import ChatJob, ModelService
from engine.errors import EngineError

log = logging.getLogger("nsbridge.control")
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    if isinstance(exc, EngineError):
        exc = from_engine(exc)
    if isinstance(exc, HTTPError):
        return sse(to_dict(exc))
    log.error("generation failed: %r", exc)
    return sse(error_body(f"generation failed: {exc}", "server_error", "internal_error"))


async def stream_chat(service: ModelService, delivery: Delivery, job: ChatJob, completion_id: str, model_id: str,
                      transport: str | None, encoding: str | None, include_usage: bool,
                      request: Request) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    created = int(time.time())
    chunk = functools.partial(openai_format.chunk, completion_id, model_id, created)
    tokenizer = job.plan.lm.tokenizer

    def on_event(event) -> None:  # on the worker thread
        logprobs = None if event.logprob is None else openai_format.logprobs([event.logprob], tokenizer)
        acts = None
        if event.capture is not None and transport == "inline":
            # The step that produced this token; the last token also brings the final step.
            steps = {event.step} if event.finish_reason is None else {event.step, event.step + 1}
            acts = entries_for_steps(event.capture.records, steps, encoding)
        loop.call_soon_threadsafe(queue.put_nowait, ("token", event, acts, logprobs))

    async def produce() -> None:
        try:
            await queue.put(("done", await service.chat(job, on_event), None, None))
        except Exception as exc:  # reported to the client as an SSE error event
            await queue.put(("error", exc, None, None))

    task = asyncio.create_task(produce())
    final_chunk = None  # with a capture, the last chunk waits for the capture to be complete
    unsent = None  # (shm write, capture id) until the chunk with its handle has been sent
    try:
        yield sse(chunk({"role": "assistant", "content": ""}))
        while True:
            kind, item, acts, logprobs = await queue.get()
            if kind == "error":
                yield error_event(item)
                yield DONE
                return
            if kind == "token":
                delta = {"content": item.text} if item.text or item.finish_reason is None else {}
                out = chunk(delta, item.finish_reason, logprobs)
                if acts is not None:
                    out["activations"] = acts
                if item.finish_reason is not None and transport is not None:
                    final_chunk = out
                else:
                    yield sse(out)
                continue
            result = item
            if result is None:  # cancelled: the client is gone
                return
            if transport is not None:
                final_chunk = final_chunk or chunk({}, result.finish_reason)
                capture = result.capture
                final_chunk["tokens"] = capture.tokens if capture else []
                final_chunk["token_ids"] = result.token_ids
                if transport == "shm" and capture is not None:
                    write = loop.run_in_executor(None, delivery.write_shm, capture)
                    unsent = (write, capture.capture_id)
                    try:
                        handle = await asyncio.shield(write)  # client gone mid-write: see finally
                    except HTTPError as exc:  # e.g. over the shm budget: the 200 is already sent
                        unsent = None
                        yield sse(to_dict(exc))
                        yield DONE
                        return
                    # A client that left during the write: Starlette's disconnect listener cancels
                    # this stream (finally releases the capture), but under load it may not have run
                    # yet; a moment for it before the handle goes out to nobody.
                    await asyncio.sleep(0.02)
                    if await request.is_disconnected():
                        return  # a send now would be dropped silently; finally releases the capture
                    final_chunk["capture"] = {"capture_id": capture.capture_id, "handle": handle}
                    final_chunk["activations"] = shm_entries(capture, handle)
                yield sse(final_chunk)
                unsent = None
            extra = openai_format.intervention_fields(result, job.baseline_result, job.plan.sampling.seed, tokenizer)
            if extra:  # after the last token's chunk, like the usage chunk: no choices, the reports
                yield sse({**chunk({}), "choices": [], **extra})
            if include_usage:
                yield sse(openai_format.usage_chunk(completion_id, model_id, created, result))
            yield DONE
            return
    finally:
        # Client gone (or stream done): stop the worker at its next token; its capture is dropped.
        job.cancelled.set()
        if unsent is not None:  # the handle never reached the client: release the capture once written
            write, capture_id = unsent
            write.add_done_callback(
                lambda f: f.cancelled() or f.exception() is not None or delivery.release(capture_id))
        if not task.done():
            await asyncio.wait([task], timeout=30)
