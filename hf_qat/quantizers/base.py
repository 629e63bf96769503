"""The numbers a quantizer family is made of: its integer grid, a scale layout, how a stored weight is seen
as a matrix (the family itself, :class:`~hf_qat.quantizers.family.Quantizer`, is in :mod:`.family`).

Notation: ``w`` a weight, ``s`` the learnable scale of its group, ``r = w / s``.
A family maps ``r`` to an integer code ``c`` and the fake-quantized weight is ``step * c`` where
``step = s * level`` rounded to the scale dtype. The elementwise rule is the frozen :class:`Grid`;
``reference.py`` (the specification) and the Triton kernels (which must match it bit for bit) only
ever see a Grid, so a new family needs no kernel code.

A grid is uniform (a rounded, affinely mapped ratio: LSQ, SEQ) or a table of magnitudes (a
non-uniform, sign-magnitude element set such as E2M1, the elements of MXFP4 and NVFP4: the code is
the nearest table entry, see :func:`e2m1_grid`). The codes are integers either way, so export packs
integers whatever the family.

Scale layouts (:class:`ScaleLayout`): a weight ``[R, C]`` (rows = output features, or embedding rows;
C = input features / embedding dim) has scales ``[R, C // G]`` for groups of G input columns,
``[R, 1]`` per channel, ``[1, 1]`` per tensor. A weight stored otherwise (a stack of expert matrices,
a transposed stack) is seen as such a matrix through its :class:`MatrixView`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QATConfigError, QATModelError
from ..expert_layout import linear_dims

# The scale is clamped to at least this in the forward pass.
SCALE_MIN = 1e-5
# SEQ's clipping threshold c.
SEQ_CLIP = 0.99


@dataclass(frozen=True)
class Grid:
    """The elementwise fake-quant rule of one family at one bit width (all values fp32).

    Forward, per weight (``r = w / s_r``, ``s_r`` the rounded scale):
        sign:        code = +1 if r >= 0 else -1                          (binary)
        magnitudes:  x = clamp(r, clip_lo, clip_hi) * mul
                     code = sign(x) * nearest(|x|, magnitudes)            (a non-uniform table, e.g. E2M1)
        else:        q = round_half_even(clamp(r, clip_lo, clip_hi) * mul + add)
                     code = q * code_mul + code_add                       (an integer)
        value = round_to_scale_dtype(s_r * level) * code
    ``nearest`` picks the closest entry of the ascending table ``magnitudes`` (integers from 0); a tie
    between entries i and i + 1 goes to the one of even index: round half to even on the element
    set, as IEEE rounds (E2M1's encodings are the table indices, so even index = mantissa bit 0).
    ``x < 0`` gives a negative code (-0.0 when its magnitude is 0); ``x = -0.0`` gives +0.
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
    magnitudes: tuple[int, ...] = ()

    @property
    def codes(self) -> list[int]:
        """Every integer code the grid can produce, ascending."""
        if self.sign:
            return [-1, 1]
        if self.magnitudes:
            return sorted({sign * m for m in self.magnitudes for sign in (-1, 1)})
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


# E2M1 (the FP4 element of MXFP4 and NVFP4): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives. Doubled, they
# are integers (ggml's kvalues_fp4 table): the codes, with a level of 0.5.
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12)
E2M1_MAX = 6.0


def e2m1_grid() -> Grid:
    """FP4 E2M1 elements times s: ``code = 2 * E2M1(clamp(r, -6, 6))`` (doubled, so an integer in
    -12..12), ``value = (s_r / 2) * code``; round to nearest, ties to even (compressed-tensors' and
    the OCP MX rule); the weight gradient passes where |r| <= 6; scale-gradient factor -6 / +6 outside,
    E2M1(r) - r inside; g uses Qp = 6."""
    return Grid(
        sign=False, clip_lo=-E2M1_MAX, clip_hi=E2M1_MAX, mul=2.0, add=0.0, code_mul=1, code_add=0, level=0.5,
        grad_lo=-E2M1_MAX, grad_hi=E2M1_MAX, mask_lo=-E2M1_MAX, mask_hi=E2M1_MAX, qp_int=int(E2M1_MAX),
        magnitudes=E2M1_DOUBLED,
    )


@dataclass(frozen=True)
class ScaleLayout:
    """How a weight ``[R, C]`` is split into groups that share one scale.

    ``group_size`` is an int (groups of that many consecutive input columns), "channel" or "tensor". A value:
    two layouts of one group size are equal (the compiled engine keys its kernels on it).
    """

    group_size: int | str

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
        per_scale = weight.numel() if self.group_size == "tensor" else int(weight.shape[1]) // n_groups
        return weight.reshape(rows_s, n_groups, per_scale)  # no rows (an empty batch's): a view of none

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
    * ``transposed``: the stack is stored ``[E, in, out]`` (:mod:`hf_qat.expert_layout`); it
      is transposed first, which makes the matrix a contiguous copy (and the way back another).
    """

    transposed: bool = False
    per_matrix: bool = False

    def matrix_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
        if len(shape) == 2:
            return int(shape[0]), int(shape[1])
        if len(shape) != 3:
            raise QATModelError(f"hf_qat quantizes 2-D weights and 3-D stacks of matrices, got shape {tuple(shape)}")
        experts, out, inp = linear_dims(shape, self.transposed)
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
