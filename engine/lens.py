"""The logit lens: what each layer's residual stream would predict if the model stopped there.

A residual `[d_model]` is read the way the model reads its last one: through the final norm
and the unembedding (the tied embedding's `as_linear`, or `lm_head`), then a softmax over the
vocabulary. Only the top-k ids and probabilities leave this module, so a caller (the viewer)
never handles vocabulary-sized tensors. One layer at a time: 30 layers x 256 positions x 49k
tokens would be 1.5 GB of logits at once.

Models whose head does more than norm + unembedding are followed where mlx-lm keeps it in plain
attributes: Cohere's `logit_scale`, Granite's `logits_scaling`, the Gemma family's
`final_logit_softcapping`. Scalings that mlx-lm writes only inside a model's `__call__` (MiniCPM's
`dim_model_base`, Falcon-H1's multipliers) are not applied: their top-k order is still right (they
are monotonic), their probabilities are those of unscaled logits.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from engine.errors import InvalidArgument

MAX_TOP_K = 100


def unembed(lm: Any, x: mx.array) -> mx.array:
    """Logits of already-normalised hidden states `x` [..., d_model], as the model's own head computes them."""
    model = lm.model
    head = getattr(model, "lm_head", None)
    args = getattr(model, "args", None)
    tied = getattr(args, "tie_word_embeddings", head is None)
    if head is not None and not (tied and hasattr(lm.arch.embedding(model), "as_linear")):
        out = head(x)
    else:
        out = lm.arch.embedding(model).as_linear(x)
    arch = lm.info.architecture
    if arch in ("cohere", "cohere2"):  # the scale lives in the inner model's args
        out = out * getattr(getattr(model, "model", None), "args", args).logit_scale
    scaling = getattr(model, "logits_scaling", None)  # granite, granitemoe, granitemoehybrid
    if scaling:
        out = out / scaling
    cap = getattr(model, "final_logit_softcapping", None) or getattr(args, "final_logit_softcapping", None)
    if cap:  # gemma2, gemma3n, gemma4_text, gear
        out = mx.tanh(out / cap) * cap
    return out


def final_norm(lm: Any, h: mx.array) -> mx.array:
    """`h` through the model's final norm (unchanged when the architecture has none)."""
    if lm.arch.final_norm is None:
        return h
    return lm.arch.norm(lm.model)(h)


def _dtype(lm: Any) -> mx.Dtype:
    """The dtype the model computes in (of a quantized model: its scales')."""
    return getattr(mx, lm.info.dtype, mx.float32)


def logit_lens(lm: Any, residuals: Any, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of softmax(unembed(final_norm(residual))) for residuals `[L, T, d_model]` (numpy or
    MLX; `[T, d_model]` is one layer). Returns (token ids int32 [L, T, k], probabilities float32
    [L, T, k]), most likely first. Runs MLX: call it on the model's worker thread."""
    if not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be an integer from 1 to {MAX_TOP_K} (got {top_k!r})", "top_k")
    arr = residuals if isinstance(residuals, mx.array) else mx.array(np.asarray(residuals, dtype=np.float32))
    if arr.ndim == 2:
        arr = arr[None]
    d_model = lm.info.d_model
    if arr.ndim != 3 or arr.shape[-1] != d_model:
        raise InvalidArgument(f"residuals must be [layers, positions, {d_model}] (got {list(arr.shape)})",
                              "residuals")
    n_layers, n_pos = arr.shape[0], arr.shape[1]
    k = min(top_k, int(lm.info.vocab_size))
    ids = np.zeros((n_layers, n_pos, k), np.int32)
    probs = np.zeros((n_layers, n_pos, k), np.float32)
    dtype = _dtype(lm)
    for layer in range(n_layers):
        logits = unembed(lm, final_norm(lm, arr[layer].astype(dtype))).astype(mx.float32)  # [T, V]
        # Top-k of the logits (the softmax keeps the order), then only those k through the softmax:
        # no [T, V] log-probabilities are made (exp over the vocabulary is the costly pass on a CPU).
        n_vocab = logits.shape[-1]
        top = mx.argpartition(logits, kth=n_vocab - k, axis=-1)[:, n_vocab - k:]
        picked = mx.take_along_axis(logits, top, axis=-1)
        order = mx.argsort(-picked, axis=-1)
        top, picked = mx.take_along_axis(top, order, axis=-1), mx.take_along_axis(picked, order, axis=-1)
        peak = mx.max(logits, axis=-1, keepdims=True)
        lse = peak + mx.log(mx.sum(mx.exp(logits - peak), axis=-1, keepdims=True))
        values = picked - lse
        mx.eval(top, values)
        ids[layer] = np.asarray(top)
        probs[layer] = np.exp(np.asarray(values))
    return ids, probs
