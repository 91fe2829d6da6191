"""What a capture produces: plain records that the shm writer, the JSON encoder and the bridge read.

One `HookRecord` per requested hook, holding one `StepTensor` per forward step (the prefill,
then one per generated token) in step order. Arrays stay MLX arrays until a consumer copies
them out, so nothing is copied on the generation hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Axis that holds the query tokens of a step, per component. Everything else is fixed across
# steps except the key axis of attention scores/patterns (axis 2), which grows with the cache.
TOKEN_AXIS = {
    "embedding": 0,
    "residual": 0,
    "attention": 0,
    "mlp": 0,
    "layernorm": 0,
    "query": 1,
    "key": 1,
    "value": 1,
    "attention_scores": 1,
    "attention_pattern": 1,
}


@dataclass
class StepTensor:
    """One hook's tensor for one forward step."""

    step: int  # 0 = prompt (prefill), then 1, 2, ... for each generated token
    start: int  # position of the step's first token in the whole sequence
    array: Any  # mx.array (or np.ndarray); the token axis is TOKEN_AXIS[component]

    @property
    def n_tokens(self) -> int:
        return int(self.array.shape[1 if self.array.ndim == 3 else 0])


@dataclass
class HookRecord:
    hook_id: str
    layer_name: str  # as the client wrote it
    module_path: str  # the model's own path, e.g. "model.layers.5" (or "model.embed_tokens")
    layer_index: int | None  # decoder layer, None for embedding / final norm
    component: str
    is_input: bool
    dtype: str  # "float32" | "float16" | "bfloat16"
    steps: list[StepTensor] = field(default_factory=list)

    @property
    def token_axis(self) -> int:
        return TOKEN_AXIS[self.component]


@dataclass
class CaptureResult:
    capture_id: str
    model_id: str
    token_ids: list[int]  # prompt followed by generated tokens
    tokens: list[str]  # decoded text of each position, for labelling axes
    prompt_tokens: int
    hooks: list[HookRecord]


def to_numpy(array: Any) -> np.ndarray:
    """A zero-copy numpy view of an evaluated MLX array (bfloat16 comes back as its uint16 bits)."""
    if isinstance(array, np.ndarray):
        return array
    import mlx.core as mx

    if array.dtype == mx.bfloat16:
        raw = np.frombuffer(memoryview(array).cast("B"), dtype=np.uint16)
        return raw.reshape(array.shape)
    return np.asarray(array)
