"""How a capture reaches the client: inline JSON entries, or a shared-memory handle.

Shared-memory captures live in the registry until the client releases them or their TTL
passes; the HTTP endpoints read and release them here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.convertors import Convertor, register_url_convertor

import numpy as np

from control.errors import CaptureTooLarge, NotFound
from control.inline import inline_activations
from engine.errors import InvalidArgument
from engine.interventions import SourceTensor
from shm import CaptureBudgetExceeded, ShmRegistry, ShmSpaceError, UnknownSegment, write_capture
from shm.reader import HookArray, read_capture_bytes
from shm.writer import stored_shape


CAPTURE_ID_PATTERN = "^cap_[0-9a-f]{16}$"  # engine.generate makes them: "cap_" + 8 random bytes in hex
VECTOR_ID_PATTERN = "^vec_[0-9a-f]{16}$"  # engine.vectors makes them the same way


class IdConvertor(Convertor):
    """`{capture_id:capture_id}` in a route: only ids of that kind match, so
    /v1/activations/points is never taken for a capture."""

    def __init__(self, pattern: str):
        self.regex = pattern.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("capture_id", IdConvertor(CAPTURE_ID_PATTERN))
register_url_convertor("vector_id", IdConvertor(VECTOR_ID_PATTERN))


class Delivery:
    def __init__(self, registry: ShmRegistry, ttl_s: float):
        self.registry, self.ttl_s = registry, ttl_s

    async def deliver(self, result: Any, transport: str, encoding: str) -> dict:
        """The response fields of a finished capture: tokens, token_ids and activations (+ capture)."""
        capture = result.capture
        out: dict = {"tokens": capture.tokens if capture else [], "token_ids": result.token_ids}
        if capture is None:
            out["activations"] = {}
        elif transport == "inline":
            out["activations"] = await asyncio.to_thread(inline_activations, capture, encoding)
        else:
            handle = await asyncio.to_thread(self.write_shm, capture)
            out["capture"] = {"capture_id": capture.capture_id, "handle": handle}
            out["activations"] = shm_entries(capture, handle)
        return out

    def write_shm(self, capture: Any) -> dict:
        try:
            return write_capture(capture, self.registry, ttl_s=self.ttl_s).to_dict()
        except (CaptureBudgetExceeded, ShmSpaceError) as exc:  # not a 500: the client can release or shrink
            raise CaptureTooLarge(f"{exc}; release captures (DELETE /v1/activations/{{id}}) or lower the request's "
                                  "size", "activations_transport") from exc

    def check_room(self) -> None:
        status = self.registry.status()
        if status.get("budget_bytes") and status.get("live_bytes", 0) >= status["budget_bytes"]:
            raise CaptureTooLarge(
                "the shared-memory budget is used up by live captures; release some "
                "(DELETE /v1/activations/{id}) or wait for them to expire", "activations_transport")

    def status(self) -> dict:
        self.registry.reap_expired()
        return self.registry.status()

    def read(self, capture_id: str) -> memoryview:
        try:
            return self.registry.read_bytes(capture_id)
        except (UnknownSegment, KeyError):
            raise NotFound(f"no live capture {capture_id!r}: it was released, expired, or never existed") from None

    def release(self, capture_id: str) -> bool:
        return self.registry.release(capture_id)

    # --- captures as the source of a patch or a vector -----------------------------------
    def hook(self, capture_id: str, hook_id: str) -> tuple[HookArray, int]:
        """A live capture's hook (its column: the hook_id, or `<id>:input`), copied out of shared
        memory so that a release cannot pull it away, and the capture's prompt length. Errors
        are the engine's InvalidArgument, naming `source.capture_id` / `source.hook_id`."""
        try:
            data = self.registry.read_bytes(capture_id)
        except (UnknownSegment, KeyError):
            raise InvalidArgument(f"no live capture {capture_id!r}: it was released, expired, or never existed; "
                                  "a capture stays on the server when it is requested with activations_transport "
                                  "'shm' (GET /v1/activations lists the live ones)", "source.capture_id") from None
        with read_capture_bytes(data) as view:
            if hook_id not in view.hooks:
                raise InvalidArgument(f"capture {capture_id!r} has no hook {hook_id!r}; it has "
                                      f"{', '.join(sorted(view.hooks))}", "source.hook_id")
            h = view.hooks[hook_id]
            return HookArray(h.column, h.info, h.data.copy(), h.step.copy(), h.position.copy()), view.prompt_tokens

    def patch_source(self, capture_id: str, hook_id: str) -> SourceTensor:
        """engine.interventions' `sources`: a captured tensor to patch in."""
        h, prompt_tokens = self.hook(capture_id, hook_id)
        info = h.info
        return SourceTensor(info.component, info.layer_index, info.is_input, h.position.astype(np.int64),
                            h.to_float32(), prompt_tokens)


def shm_entries(capture: Any, handle: dict) -> dict:
    """Entries that describe each hook's array in the Arrow stream instead of carrying data."""
    out: dict = {}
    for rec in capture.hooks:
        if not rec.steps:
            continue
        out.setdefault(rec.hook_id, []).append({
            "hook_id": rec.hook_id, "layer_name": rec.layer_name, "layer_index": rec.layer_index,
            "component": rec.component, "shape": [int(d) for d in stored_shape(rec)], "dtype": rec.dtype,
            "is_input": rec.is_input, "module_path": rec.module_path, "steps": len(rec.steps), "handle": handle,
        })
    return out
