"""OpenAI chat-completion objects: the full response and the streamed chunks."""

from __future__ import annotations

import time

from engine.generate import TokenLogprob, token_texts


def usage(generation) -> dict:
    """`generation`: the engine's Completion (prompt_tokens, completion_tokens, token_ids)."""
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": len(generation.token_ids),
    }


def logprobs(entries: list[TokenLogprob] | None, tokenizer) -> dict | None:
    """OpenAI's `choices[].logprobs` for the engine's per-token log-probabilities (None: not asked).

    Each content entry is OpenAI's (`token`, `logprob`, `bytes`, `top_logprobs`) plus the
    token's id (`token_id`, also in each top entry: texts can be ambiguous, ids are not) and,
    when the request named `logprob_token_ids`, `target_logprobs` in the order asked. `bytes`
    are the UTF-8 of the token's decoded text."""
    if entries is None:
        return None
    ids = sorted({t for e in entries for t in (e.token, *(i for i, _ in e.top), *(i for i, _ in e.targets))})
    texts = dict(zip(ids, token_texts(tokenizer, ids)))
    return {"content": [_content(e, texts) for e in entries], "refusal": None}


def _content(entry: TokenLogprob, texts: dict[int, str]) -> dict:
    out = {**_token(entry.token, entry.logprob, texts),
           "top_logprobs": [_token(t, lp, texts) for t, lp in entry.top]}
    if entry.targets:
        out["target_logprobs"] = [{"token_id": t, "token": texts[t], "logprob": lp} for t, lp in entry.targets]
    return out


def _token(token: int, logprob: float, texts: dict[int, str]) -> dict:
    text = texts[token]
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")), "token_id": token}


def completion(completion_id: str, model_id: str, generation, tokenizer) -> dict:
    """`generation`: the engine's Completion; `tokenizer` decodes its log-probabilities' tokens."""
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
                "logprobs": logprobs(generation.logprobs, tokenizer),
                "finish_reason": generation.finish_reason,
            }
        ],
        "usage": usage(generation),
    }


def chunk(completion_id: str, model_id: str, created: int, delta: dict, finish_reason: str | None = None,
          logprobs: dict | None = None) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_id,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
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


def intervention_fields(generation, baseline, seed: int | None, tokenizer) -> dict:
    """What interventions add to a response: the report of each intervention (positions touched
    per step), and the baseline completion (`baseline`: its Completion, or None) in the same
    choices/usage shape, so steered and baseline sit side by side, with the seed both sampled
    with (the server picks one when sampling without a seed, so the pair can be reproduced)."""
    out = {}
    if generation.interventions:
        out["interventions"] = generation.interventions
    if baseline is not None:
        plain = completion("", "", baseline, tokenizer)
        out["baseline"] = {"choices": plain["choices"], "usage": plain["usage"], "seed": seed}
    return out
