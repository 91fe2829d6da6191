"""Captures built from real MLX arrays without a model, for tests and benchmarks.

Shapes follow the engine (engine/generate.py, engine.records): a prefill step of `prompt_len`
tokens, then `decode_steps` steps of one token each whose attention key axis grows by one.
Each decode step feeds one generated token, the last one included (the engine runs one more
step over the final token so that every position has activations), so there are
`prompt_len + decode_steps` tokens and every one has a row. Scores carry the causal mask
(-inf) and patterns are their softmax, as the engine captures them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import mlx.core as mx

from engine.records import CaptureResult, HookRecord, StepTensor
from vocabulary import COMPONENT_NAMES, COMPONENTS

ALL_COMPONENTS = COMPONENT_NAMES
_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def step_layout(prompt_len: int, decode_steps: int) -> list[tuple[int, int, int]]:
    """(step, start, n_tokens) of the prefill and each decode step."""
    return [(0, 0, prompt_len)] + [(i, prompt_len + i - 1, 1) for i in range(1, decode_steps + 1)]


def synthetic_capture(
    components: Sequence[str] = ALL_COMPONENTS,
    layers: Sequence[int] = (0,),
    prompt_len: int = 6,
    decode_steps: int = 3,
    dtype: str = "float32",
    d_model: int = 32,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_head: int = 8,
    seed: int = 0,
    capture_id: str | None = None,
) -> CaptureResult:
    mx.random.seed(seed)
    dt = _MX_DTYPES[dtype]
    layout = step_layout(prompt_len, decode_steps)
    total = prompt_len + decode_steps
    hooks: list[HookRecord] = []
    for layer in layers:
        for comp in components:
            steps = [StepTensor(s, start, _tensor(comp, start, n, d_model, n_heads, n_kv_heads, d_head).astype(dt)) for s, start, n in layout]
            hooks.append(
                HookRecord(
                    hook_id=f"{comp}_{layer}",
                    layer_name=f"transformer.h.{layer}",
                    module_path=f"model.layers.{layer}",
                    layer_index=layer,
                    component=comp,
                    is_input=False,
                    dtype=dtype,
                    steps=steps,
                )
            )
    mx.eval([s.array for h in hooks for s in h.steps])
    token_ids = [int(t) for t in mx.random.randint(0, 1000, (total,)).tolist()]
    return CaptureResult(
        capture_id=capture_id or secrets.token_hex(8),
        model_id="synthetic",
        token_ids=token_ids,  # prompt, then one generated token per decode step; each has a row
        tokens=[f"t{t}" for t in token_ids],
        prompt_tokens=prompt_len,
        hooks=hooks,
    )


def _tensor(comp: str, start: int, n: int, d_model: int, n_heads: int, n_kv: int, d_head: int) -> mx.array:
    sizes = COMPONENTS[comp].sizes
    if "key" not in sizes:  # engine layout: the tokens on the component's token axis
        dims = {"d_model": d_model, "n_heads": n_heads, "n_kv_heads": n_kv, "d_head": d_head, "d_mlp": 2 * d_model,
                "n_experts": 4}
        shape = [dims[s] for s in sizes]
        shape.insert(COMPONENTS[comp].token_axis, n)
        return mx.random.normal(tuple(shape))
    # Scores of these queries against all keys so far, causally masked.
    q = mx.random.normal((n_heads, n, d_head))
    k = mx.random.normal((n_heads, start + n, d_head))
    scores = (q @ k.transpose(0, 2, 1)) * (d_head**-0.5)
    qpos = mx.arange(start, start + n)[:, None]
    kpos = mx.arange(start + n)[None, :]
    scores = mx.where(kpos <= qpos, scores, mx.array(-float("inf")))
    return scores if comp == "attention_scores" else mx.softmax(scores, axis=-1)
