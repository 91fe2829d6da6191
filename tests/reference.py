"""Helpers shared by the fidelity tests (test_capture.py, test_interventions.py): comparing
against a float32 reference, the model's forward steps by hand, and checking that a request
leaves the model exactly as it found it."""

from __future__ import annotations

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np

from engine import capture as capture_mod


def assert_close(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    """Equal within `tol` relative to the reference's magnitude (at least 1); -inf (masked scores)
    must sit at the same places in both."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    finite = np.isfinite(want)
    if not finite.all():  # masked scores: -inf in both, compare the rest
        assert np.array_equal(np.isneginf(got), np.isneginf(want)), f"{what}: masked entries differ"
        got, want = got[finite], want[finite]
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    err = float(np.abs(got - want).max()) / scale if want.size else 0.0
    assert err <= tol, f"{what}: max error {err:.2e} relative to magnitude {scale:.3g} (tolerance {tol:.0e})"


def stepwise_logits(lm, prompt, n_steps, capture=None):
    """Our loop's forward steps by hand (prefill, then one token at a time), returning every logits row."""
    from mlx_lm.models.cache import make_prompt_cache

    cache, out, tokens, start = make_prompt_cache(lm.model), [], list(prompt), 0
    for step in range(n_steps):
        if capture is not None:
            capture.begin_step(step, start)
        logits = lm.model(mx.array(tokens)[None], cache=cache)[:, -1, :]
        mx.eval(logits, *(capture.end_step() if capture is not None else ()))
        out.append(np.array(logits))
        start += len(tokens)
        tokens = [int(np.argmax(out[-1]))]
    return out


def snapshot(lm):
    """The model's module classes and parameters (objects and values), to compare after a request."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import base, gpt2, llama

    classes = {name: type(m) for name, m in lm.model.named_modules()}
    params = dict(tree_flatten(lm.model.parameters()))
    values = {k: np.array(v) for k, v in params.items()}
    seams = {m.__name__: m.scaled_dot_product_attention for m in (llama, gpt2)}
    assert all(f is base.scaled_dot_product_attention for f in seams.values())
    return classes, params, values


def assert_unchanged(lm, before):
    """No tapped class, seam, active capture or held lock is left, and every parameter is the same
    array with the same values as in `before` (a `snapshot`)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import base, gpt2, llama

    classes, params, values = before
    assert {name: type(m) for name, m in lm.model.named_modules()} == classes
    for m in lm.model.modules():
        assert type(m) not in capture_mod._tapped_classes.values()
    now = dict(tree_flatten(lm.model.parameters()))
    assert now.keys() == params.keys()
    for k, v in now.items():
        assert v is params[k] and np.array_equal(np.array(v), values[k]), k
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert gpt2.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert capture_mod._active is None
    assert capture_mod._INSTALL_LOCK.acquire(blocking=False)
    capture_mod._INSTALL_LOCK.release()


def causal_attention(query, key, value, scaling=None):
    """Reference attention over a whole sequence (torch, [B, H, T, D]; keys/values per KV head):
    (scores masked with -inf above the diagonal, softmax pattern, pattern @ values)."""
    import torch

    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    n_rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    t_q, t_k = query.shape[2], k.shape[2]
    scores = (query @ k.transpose(-1, -2)) * scaling
    causal = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)
    scores = scores.masked_fill(~causal, float("-inf"))
    pattern = torch.softmax(scores, dim=-1)
    return scores, pattern, pattern @ v
