"""What a quantizer family is: an integer grid, a scale layout, and a rule for the first scale.

Notation (METHOD.md section 5): ``w`` a weight, ``s`` the learnable scale of its group, ``r = w / s``.
A family maps ``r`` to an integer code ``c`` and the fake-quantized weight is ``step * c`` where
``step = s * level`` rounded to the scale dtype. The elementwise rule is the frozen :class:`Grid`;
``reference.py`` (the specification) and the Triton kernels (which must match it bit for bit) only
ever see a Grid, so a new family needs no kernel code.

Scale layouts (:class:`ScaleLayout`): a weight ``[R, C]`` (rows = output features, or embedding rows;
C = input features / embedding dim) has scales ``[R, C // G]`` for groups of G input columns,
``[R, 1]`` per channel, ``[1, 1]`` per tensor. A weight stored otherwise (a stack of expert matrices,
a transposed stack) is seen as such a matrix through its :class:`MatrixView`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..bits import TERNARY_BITS, bits_label
from ..errors import QATConfigError, QATModelError

# The scale is clamped to at least this in the forward pass (METHOD.md section 5).
SCALE_MIN = 1e-5
# SEQ's clipping threshold c.
SEQ_CLIP = 0.99


@dataclass(frozen=True)
class Grid:
    """The elementwise fake-quant rule of one family at one bit width (all values fp32).

    Forward, per weight (``r = w / s_r``, ``s_r`` the rounded scale):
        sign:  q = +1 if r >= 0 else -1                                  (binary)
        else:  q = round_half_even(clamp(r, clip_lo, clip_hi) * mul + add)
        code = q * code_mul + code_add                                    (an integer)
        value = round_to_scale_dtype(s_r * level) * code
    Backward:
        dL/dw = dL/dvalue where mask_lo <= r <= mask_hi, else 0   (clipped straight-through)
        dL/ds = g * sum over the group of dL/dvalue * factor, with
            sign:  factor = q
            else:  factor = grad_lo if r < clip_lo, grad_hi if r > clip_hi, else code * level - r
    """

    sign: bool
    clip_lo: float
    clip_hi: float
    mul: float
    add: float
    code_mul: int
    code_add: int
    level: float
    grad_lo: float
    grad_hi: float
    mask_lo: float
    mask_hi: float
    qp_int: int

    @property
    def codes(self) -> list[int]:
        """Every integer code the grid can produce, ascending."""
        if self.sign:
            return [-1, 1]
        lo = round(self.clip_lo * self.mul + self.add)
        hi = round(self.clip_hi * self.mul + self.add)
        return sorted({q * self.code_mul + self.code_add for q in range(lo, hi + 1)})


def lsq_grid(bits: int, mask_all: bool = False) -> Grid:
    """Symmetric signed integers [-2^(b-1), 2^(b-1) - 1] times s (LSQ and absmax)."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    inf = float("inf")
    return Grid(
        sign=False, clip_lo=float(qn), clip_hi=float(qp), mul=1.0, add=0.0, code_mul=1, code_add=0,
        level=1.0, grad_lo=float(qn), grad_hi=float(qp),
        mask_lo=-inf if mask_all else float(qn), mask_hi=inf if mask_all else float(qp),
        qp_int=qp,
    )


class ScaleLayout:
    """How a weight ``[R, C]`` is split into groups that share one scale.

    ``group_size`` is an int (groups of that many consecutive input columns), "channel" or "tensor".
    """

    def __init__(self, group_size: int | str) -> None:
        self.group_size = group_size

    def scale_shape(self, weight_shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        rows, cols = int(weight_shape[0]), int(weight_shape[1])
        if self.group_size == "tensor":
            return (1, 1)
        if self.group_size == "channel":
            return (rows, 1)
        return (rows, cols // int(self.group_size))

    def check(self, weight_shape: tuple[int, ...] | torch.Size, module_name: str) -> None:
        """Raise QATModelError when the group size does not divide the layer's input width."""
        if len(weight_shape) != 2:
            raise QATModelError(f"{module_name}: hf_qat quantizes 2-D weights, got shape {tuple(weight_shape)}")
        if isinstance(self.group_size, int):
            cols = int(weight_shape[1])
            if cols % self.group_size:
                divisors = [g for g in (2 ** k for k in range(1, 17)) if cols % g == 0]
                raise QATConfigError(
                    "group_size",
                    self.group_size,
                    f"a power of two that divides {module_name}'s input width {cols} "
                    f"({', '.join(map(str, divisors)) or 'none'}), 'channel' or 'tensor'",
                    detail="Exclude the layer with exclude_modules or choose another group_size",
                )

    def group_view(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight [R, C]`` viewed as ``[R, n_groups, C // n_groups]`` (per tensor: ``[R, 1, C]``):
        the layout of the elementwise math, which broadcasts the scale over the last dim."""
        rows, cols = weight.shape
        n_groups = self.scale_shape(weight.shape)[1]
        return weight.reshape(rows, n_groups, cols // n_groups)

    def scale_view(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` viewed as ``[*scale_shape, weights per scale]``: what scale statistics reduce
        over (per tensor: ``[1, 1, R * C]``)."""
        rows_s, n_groups = self.scale_shape(weight.shape)
        return weight.reshape(rows_s, n_groups, weight.numel() // (rows_s * n_groups))

    def __repr__(self) -> str:
        return f"ScaleLayout({self.group_size!r})"


@dataclass(frozen=True)
class MatrixView:
    """How a stored weight is seen as the matrix ``[R, C]`` of the quantization math (C = the input dim).

    * A 2-D weight ``[out, in]`` (Linear, Embedding rows) is its own matrix.
    * A stack of E matrices ``[E, out, in]`` (transformers' fused MoE experts) is ``[E * out, in]``: every
      expert's output rows, each row's groups along that expert's input dim, so group and channel
      scales are per expert row and the kernels run over all experts at once (a view, no copy).
    * ``per_matrix`` (per-tensor scales of a stack): ``[E, out * in]``, one row per expert, so a
      channel scale ``[E, 1]`` of that matrix is one scale per expert matrix.
    * ``transposed``: the stack is stored ``[E, in, out]`` (``is_transposed`` experts, e.g. gpt_oss); it
      is transposed first, which makes the matrix a contiguous copy (and the way back another).
    """

    transposed: bool = False
    per_matrix: bool = False

    def matrix_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        if len(shape) == 2:
            return int(shape[0]), int(shape[1])
        if len(shape) != 3:
            raise QATModelError(f"hf_qat quantizes 2-D weights and 3-D stacks of matrices, got shape {tuple(shape)}")
        experts, out, inp = (int(shape[0]), int(shape[2]), int(shape[1])) if self.transposed else map(int, shape)
        return (experts, out * inp) if self.per_matrix else (experts * out, inp)

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (stored layout) -> ``[R, C]`` (a view unless transposed)."""
        if weight.ndim == 2:
            return weight
        stack = weight.transpose(-1, -2) if self.transposed else weight
        return stack.reshape(self.matrix_shape(weight.shape))

    def from_matrix(self, matrix: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """``[R, C]`` -> the stored layout ``shape``: a view, except for a transposed stack, which comes
        back as a contiguous copy (so matmuls read it in the same memory order as the stored weight,
        and compute what a model holding these values computes, bit for bit)."""
        if len(shape) == 2:
            return matrix
        if self.transposed:
            return matrix.reshape(shape[0], shape[2], shape[1]).transpose(-1, -2).contiguous()
        return matrix.reshape(shape)


class Quantizer:
    """A quantizer family at one bit width: its grid and how a group's first scale is computed.

    Subclass, set ``name``/``supported_bits``/``learnable``, implement :meth:`grid` and
    :meth:`init_scale`, and register with :func:`hf_qat.quantizers.register_quantizer`.
    """

    name: ClassVar[str] = ""
    supported_bits: ClassVar[tuple[float, ...]] = ()
    learnable: ClassVar[bool] = True

    def __init__(self, bits: float | int) -> None:
        self.check_bits(bits)
        self.bits = bits

    @classmethod
    def check_bits(cls, bits: float | int, field_name: str = "bits", method_field: str = "method") -> None:
        if bits not in cls.supported_bits:
            allowed = ", ".join(bits_label(b) if b == TERNARY_BITS else str(b) for b in cls.supported_bits)
            raise QATConfigError(
                field_name,
                bits,
                f"{allowed} with {method_field}={cls.name!r}",
                detail=f"Choose another {method_field} (or 'auto') for {bits_label(bits)}-bit weights",
            )

    def grid(self) -> Grid:
        raise NotImplementedError

    def init_scale(self, groups: torch.Tensor) -> torch.Tensor:
        """The first scale of every group: ``groups [*scale_shape, n]`` fp32 (a
        :meth:`ScaleLayout.scale_view`) -> ``scale_shape`` fp32."""
        raise NotImplementedError

    def grad_scale(self, weight_numel: int, scale_numel: int, mode: str) -> float:
        """ParetoQ's scale-gradient factor g = 1 / sqrt(n * Qp) (METHOD.md section 5).

        mode "paretoq": n = weights in the whole matrix; "lsq": n = weights per scale.
        """
        n = weight_numel if mode == "paretoq" else weight_numel // scale_numel
        return 1.0 / math.sqrt(n * self.grid().qp_int)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={bits_label(self.bits)})"
