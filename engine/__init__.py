"""The MLX engine: model loading, generation and activation capture.

    import engine
    model = engine.load("default")

The public API (`load`, `Model`, `Completion`, `TokenEvent`, `GenerationPlan`) lives in
engine/api.py and is imported on first use, so that `import engine` (or engine.errors,
engine.params) stays light: only OpenBLAS is loaded here.
"""

from typing import TYPE_CHECKING

from engine.blas import load_openblas

load_openblas()  # before anything imports mlx.core

_API = ("load", "Model", "Completion", "TokenEvent", "GenerationPlan")
__all__ = list(_API)

if TYPE_CHECKING:
    from engine.api import Completion, GenerationPlan, Model, TokenEvent, load  # noqa: F401


def __getattr__(name: str):
    if name in _API:
        from engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
