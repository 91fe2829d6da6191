"""OpenAI chat-completion objects: the full response and the streamed chunks."""

from __future__ import annotations

import time

def usage(generation) -> dict:
    """`generation`: the engine's Completion (prompt_tokens, completion_tokens, token_ids)."""
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": len(generation.token_ids),
    }


def completion(completion_id: str, model_id: str, generation) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": None,
                "finish_reason": generation.finish_reason,
            }
        ],
        "usage": usage(generation),
    }


def chunk(completion_id: str, model_id: str, created: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_id,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(completion_id: str, model_id: str, created: int, generation) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_id,
        "choices": [],
        "usage": usage(generation),
    }
