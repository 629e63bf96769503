"""Quantizer families (ParetoQ's integer grids, the block-scaled floats, ggml's blocks) and the registry that names them.

``reference.py`` holds the PyTorch forward/backward that is the specification the Triton kernels
match bit for bit.
"""

from .base import SCALE_MIN, SEQ_CLIP, Grid, MatrixView, ScaleLayout, e2m1_grid, lsq_grid
from .family import Quantizer
from .registry import available_quantizers, family_of_ggml_type, get_quantizer, get_quantizer_class, register_quantizer

# Importing the families registers them (in this order: the names "auto" resolves to come first).
from . import lsq, seq, binary, absmax, mxfp4, nvfp4, kquants, iq4_xs, q1_0  # noqa: E402,F401  isort: skip

__all__ = [
    "SCALE_MIN",
    "SEQ_CLIP",
    "Grid",
    "MatrixView",
    "Quantizer",
    "ScaleLayout",
    "available_quantizers",
    "e2m1_grid",
    "family_of_ggml_type",
    "get_quantizer",
    "get_quantizer_class",
    "lsq_grid",
    "register_quantizer",
]
