"""A quantizer family: what a weight's grid is, and everything that depends on it.

A family is asked, never branched on: the unit (:class:`hf_qat.model.unit.WeightQuantizer`) asks it for the first
scale (:meth:`Quantizer.init_scale`, :meth:`Quantizer.mse_scale`), the codes export packs
(:meth:`Quantizer.encode`) and the weight on its grid (:meth:`Quantizer.fake_quantize`); the kernels' dispatch
asks it which forward serves it (:meth:`Quantizer.own_forward`: None, the Grid engines of
:mod:`hf_qat.kernels`); the planner its bits per weight (:meth:`Quantizer.storage_bits`); the exporters what
each format stores of it. The defaults here are those of a family on a :class:`~.base.Grid` with the
config's scale layout (:mod:`.reference`); a family with its own math (ggml's blocks, :mod:`.kquants`)
overrides them. docs/architecture.md has the recipe for a new family.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..bits import TERNARY_BITS, bits_label
from ..errors import QATConfigError
from .base import E2M1_DOUBLED, Grid, e2m1_grid
from .ggml_blocks import pack_fp4, pack_steps
from .reference import WeightQuantSpec, fake_quantize_weight, mse_scale, quantize_codes


class Quantizer:
    """A quantizer family at one bit width: its grid and how a group's first scale is computed.

    Subclass, set ``name``/``supported_bits``/``learnable``, implement :meth:`grid` and
    :meth:`init_scale`, and register with :func:`hf_qat.quantizers.register_quantizer`.
    """

    name: ClassVar[str] = ""
    supported_bits: ClassVar[tuple[float, ...]] = ()
    learnable: ClassVar[bool] = True
    # A block-scaled format fixes both its group size (the block) and the dtype its scales are rounded to;
    # None: the config's group_size and scale_dtype.
    block_size: ClassVar[int | None] = None
    scale_dtype: ClassVar[torch.dtype | None] = None
    # Learned numbers per group: 1 (a scale), or 2 (a scale and a min: the asymmetric ggml k-quants, whose
    # scales are then ``[*scale_shape, 2]``).
    scale_components: ClassVar[int] = 1
    # A weight's input width must be a multiple of this (None: of block_size): ggml's k-quant super-block.
    row_multiple: ClassVar[int | None] = None
    # The only export formats that hold this family (None: any whose problem() accepts the layer), and what its
    # blocks are, for the refusal of the others.
    export_formats: ClassVar[tuple[str, ...] | None] = None
    export_blocks: ClassVar[str] = ""
    # compressed-tensors' (format, preset scheme) of a family it stores in a format of its own (the FP4 families'
    # E2M1 pack-quantized formats: :meth:`E2M1Quantizer.nibbles`, :meth:`E2M1Quantizer.stored_scales`), or None:
    # its integer pack-quantized format judges the layer's codes.
    compressed_tensors_scheme: ClassVar[tuple[str, str] | None] = None
    # The GGML types llama.cpp's file types give weights that this family trains (QATConfig.gguf_mix):
    # type -> (bits, group size); :func:`~.registry.family_of_ggml_type` asks every family.
    llama_cpp_types: ClassVar[dict[str, tuple[float, int]]] = {}
    # Whether the format scales a whole tensor once more (NVFP4's fp32 ``g``; one for a whole fused expert stack),
    # so that a row's quantized values depend on every row's scales, not on its own alone.
    tensor_scale: ClassVar[bool] = False

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

    @classmethod
    def check_group_size(cls, group_size: int | str, method_field: str = "method") -> None:
        """A block-scaled family takes its own block only (QATConfigError otherwise)."""
        if cls.block_size is not None and group_size != cls.block_size:
            raise QATConfigError(
                "group_size", group_size, f"{cls.block_size} with {method_field}={cls.name!r} (its format's block)",
                detail=f"{cls.name} stores one scale per block of {cls.block_size} weights; leave group_size unset",
            )

    def storage_bits(self) -> float | None:
        """Bits one weight takes in the format this family fixes, its block's scale included (MXFP4:
        4 + 8 / 32 = 4.25); None for families whose scale overhead is the config's (group_size, scale_dtype)."""
        if self.block_size is None:
            return None
        return self.bits + 8 * self.scale_dtype.itemsize / self.block_size

    def narrow_width_advice(self, width: int) -> str:
        """What else to do, besides excluding it, with a weight of input width ``width``, not a multiple of
        the family's block ("" when nothing else works); appended to the width error."""
        return ""

    def grid(self) -> Grid:
        raise NotImplementedError

    def init_scale(self, groups: torch.Tensor) -> torch.Tensor:
        """The first scale of every group: ``groups [*scale_shape, n]`` fp32 (a
        :meth:`ScaleLayout.scale_view`) -> ``scale_shape`` fp32."""
        raise NotImplementedError

    def own_forward(self) -> Callable[[torch.Tensor, torch.Tensor, float, Any], torch.Tensor] | None:
        """The family's own differentiable forward ``(matrix, scale, grad_scale, engine) -> matrix`` (``engine``:
        the one :mod:`hf_qat.kernels` chose for the weight's device, whose passes it calls); None (a Grid
        family): the engines' Grid passes serve it."""
        return None

    def fake_quantize(self, matrix: torch.Tensor, scale: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
        """``matrix [R, C]`` on the grid, forward only, in PyTorch (bake, metrics, the mse search)."""
        return fake_quantize_weight(matrix, scale, spec)

    def encode(self, matrix: torch.Tensor, scale: torch.Tensor,
               spec: WeightQuantSpec) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(codes int8 [R, C], step fp32 [scale shape], block scales or None)``: what export packs;
        ``step * codes`` is :meth:`fake_quantize` exactly (a family with block scales of its own, ggml's,
        returns them third, and its packers read them)."""
        return (*quantize_codes(matrix, scale, spec), None)

    def mse_scale(self, matrix: torch.Tensor, first_scale: torch.Tensor, spec: WeightQuantSpec,
                  importance: torch.Tensor | None = None) -> torch.Tensor:
        """``scale_init="mse"``: ``first_scale`` times each scale's clipping ratio of least squared error
        (:func:`~.reference.mse_scale`), the error weighted per input column by ``importance``."""
        return mse_scale(matrix, first_scale, spec, importance=importance)

    def pack_gguf(self, codes: torch.Tensor, step: torch.Tensor, block_scales: Any, qtype: str | None = None) -> np.ndarray:
        """The raw GGUF blocks ``uint8 [R, bytes]`` of the block type ``qtype`` (:meth:`gguf_type`'s answer; a
        family of one type ignores it) for the matrix ``codes [R, C]``, with its steps or its own block scales
        (:meth:`encode`). The default writes the blocks of codes and fp16 steps (Q4_0, Q5_0, Q8_0, TQ1_0, TQ2_0)."""
        if qtype is None:
            raise ValueError(f"{self.name}: pack_gguf needs qtype, the block type gguf_type() gives the layer")
        return pack_steps(codes, step, qtype)

    def export_problem(self, format_name: str) -> str | None:
        """Why the export format ``format_name`` cannot hold this family whatever the layer, or None: a family
        only some formats hold (:attr:`export_formats`) says so; the others leave it to the format, which
        judges the layer's grid, step and shape."""
        if self.export_formats is None or format_name in self.export_formats:
            return None
        only = " / ".join(f"format={name!r}" for name in self.export_formats)
        return f"{self.name}'s blocks ({self.export_blocks}) are written exactly by {only} only"

    def gguf_type(self, group_size: int | str, scale_dtype: torch.dtype, ternary_type: str) -> str | None:
        """The GGML block type that stores this family's codes exactly with ``group_size`` and steps rounded to
        ``scale_dtype`` (ternary codes: ``ternary_type``, "TQ2_0" or "TQ1_0"), or None. The default recognises
        the integer grids llama.cpp has blocks for: signed 4, 5 and 8 bits in groups of 32 with fp16 steps
        (Q4_0, Q5_0, Q8_0) and ternary codes in groups of 256 (TQ2_0, TQ1_0)."""
        grid, integer = self.grid(), {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}
        if scale_dtype != torch.float16:
            return None
        if (self.bits in integer and grid.level == 1.0 and group_size == 32
                and grid.codes == list(range(-2 ** (self.bits - 1), 2 ** (self.bits - 1)))):
            return integer[self.bits]
        if self.bits == TERNARY_BITS and grid.codes == [-1, 0, 1] and group_size == 256:
            return ternary_type
        return None

    def grad_scale(self, weight_numel: int, scale_numel: int, mode: str) -> float:
        """ParetoQ's scale-gradient factor g = 1 / sqrt(n * Qp) (arXiv 2502.02631).

        mode "paretoq": n = weights in the whole matrix; "lsq": n = weights per scale.
        """
        n = weight_numel if mode == "paretoq" else weight_numel // scale_numel
        return 1.0 / math.sqrt(n * self.grid().qp_int)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={bits_label(self.bits)})"


class E2M1Quantizer(Quantizer):
    """A block-scaled 4-bit float family (MXFP4, NVFP4): E2M1 elements, one scale per ``block_size``
    weights stored as ``scale_dtype``; the first scale is the block's ``amax / first_scale_divisor``.
    Subclasses set those three."""

    supported_bits = (4,)
    first_scale_divisor: ClassVar[float] = 6.0
    compressed_tensors_scheme: ClassVar[tuple[str, str]]

    def grid(self) -> Grid:
        return e2m1_grid()

    def stored_scales(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(stored block scales shaped like step, per-tensor scale fp32 [] or None)`` of the steps of one tensor
        (a layer's, or a whole expert stack's): the rounded scale ``2 * step`` (E2M1 codes are doubled) in the
        family's scale format, exactly (:mod:`.block_scales`)."""
        raise NotImplementedError

    @staticmethod
    def nibbles(codes: torch.Tensor) -> torch.Tensor:
        """Doubled E2M1 codes (-12..12, any integer dtype) -> their 4-bit encodings, uint8, same shape: bit 3 the
        sign, bits 0-2 the index of ``|c|`` in 0, 1, 2, 3, 4, 6, 8, 12 (compressed-tensors' ``unpack_fp4_from_uint8``
        and ggml's ``kvalues_fp4`` read the same encoding); a zero code is stored as +0."""
        index = torch.full((max(E2M1_DOUBLED) + 1,), -1, dtype=torch.int64)
        index[list(E2M1_DOUBLED)] = torch.arange(len(E2M1_DOUBLED))
        c = codes.to(torch.int64)
        magnitude = index[c.abs().clamp(max=max(E2M1_DOUBLED))]
        if bool((magnitude < 0).any()) or bool((c.abs() > max(E2M1_DOUBLED)).any()):
            raise ValueError("codes must be doubled E2M1 values (0, 1, 2, 3, 4, 6, 8, 12 and negatives)")
        return (magnitude | ((c < 0).to(torch.int64) << 3)).to(torch.uint8)

    def pack_gguf(self, codes: torch.Tensor, step: torch.Tensor, block_scales: Any, qtype: str | None = None) -> np.ndarray:
        return pack_fp4(self.nibbles(codes), self.stored_scales(step)[0].view(torch.uint8), self.ggml_type)

    @property
    def ggml_type(self) -> str:
        """GGUF names the block type after the format: the family's name in capitals (MXFP4, NVFP4)."""
        return self.name.upper()

    def gguf_type(self, group_size: int | str, scale_dtype: torch.dtype, ternary_type: str) -> str | None:
        return self.ggml_type

    def init_scale(self, groups: torch.Tensor) -> torch.Tensor:
        return groups.abs().amax(dim=-1) / self.first_scale_divisor
