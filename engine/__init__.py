"""The MLX engine: model loading, generation and activation capture."""

from engine.blas import load_openblas

load_openblas()  # before anything imports mlx.core
