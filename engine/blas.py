"""Use the system OpenBLAS for mlx on Linux CPUs.

mlx[cpu] wheels bundle a reference BLAS (~5 GFLOP/s float32 matmul here). Loading Debian's
OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is imported makes mlx bind to it (~175 GFLOP/s,
33x). Once mlx.core is loaded the binding is fixed, so this must run first.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

log = logging.getLogger("nsbridge.engine")

_CANDIDATES = [
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
]

BLAS_IN_USE = "mlx default"


def load_openblas() -> str:
    """Load OpenBLAS into the process if present; returns a description of the BLAS in use."""
    global BLAS_IN_USE
    if not sys.platform.startswith("linux") or os.environ.get("NSBRIDGE_NO_OPENBLAS"):
        return BLAS_IN_USE
    if BLAS_IN_USE.startswith("OpenBLAS"):
        return BLAS_IN_USE
    if "mlx.core" in sys.modules:
        BLAS_IN_USE = "mlx bundled BLAS (mlx.core was imported before OpenBLAS could be loaded)"
        return BLAS_IN_USE
    for pattern in _CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            BLAS_IN_USE = f"OpenBLAS ({path})"
            return BLAS_IN_USE
    BLAS_IN_USE = "mlx bundled reference BLAS (slow: apt-get install libopenblas0-pthread)"
    return BLAS_IN_USE
