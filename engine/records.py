"""What a capture produces: plain records that the shm writer, the JSON encoder and the bridge read.

One `HookRecord` per requested hook, holding one `StepTensor` per forward step (the prefill,
then one per generated token) in step order. Arrays stay MLX arrays until a consumer copies
them out, so nothing is copied on the generation hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shm.format import bfloat16_to_float32, column_names, stack_token_major
from shm.format import to_numpy  # noqa: F401  (re-exported: control and the benchmarks read it here)
from vocabulary import COMPONENTS


@dataclass
class StepTensor:
    """One hook's tensor for one forward step."""

    step: int  # 0 = prompt (prefill), then 1, 2, ... for each generated token
    start: int  # position of the step's first token in the whole sequence
    array: Any  # mx.array (or np.ndarray); tokens on vocabulary.COMPONENTS[component].token_axis

    @property
    def n_tokens(self) -> int:
        return int(self.array.shape[1 if self.array.ndim == 3 else 0])  # per-head tensors are [H, T, ...]


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
        return COMPONENTS[self.component].token_axis

    def token_major(self) -> np.ndarray:
        """All steps joined token-major: [positions, *per_token], attention keys padded (the
        layout of this hook's shared-memory column). bfloat16 comes back as float32 (exact:
        numpy has no bfloat16)."""
        joined = stack_token_major(self.component, [s.array for s in self.steps])
        return bfloat16_to_float32(joined) if self.dtype == "bfloat16" else joined


@dataclass
class CaptureResult:
    capture_id: str
    model_id: str
    token_ids: list[int]  # prompt followed by generated tokens
    tokens: list[str]  # decoded text of each position, for labelling axes
    prompt_tokens: int
    hooks: list[HookRecord]

    def arrays(self) -> dict[str, np.ndarray]:
        """hook -> its steps joined token-major (`HookRecord.token_major`), keyed by column name as
        in shared memory (`shm.format.column_names`): the hook_id, and `<id>:input` for the input
        of a hook captured both ways. A hook with no steps (positions left it out) is absent."""
        names = column_names([(h.hook_id, h.is_input) for h in self.hooks])
        return {name: h.token_major() for name, h in zip(names, self.hooks) if h.steps}

