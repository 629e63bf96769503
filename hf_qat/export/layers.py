"""What every export starts from: the integer codes and steps of each quantized layer, and the rest.

Export is packing, never re-quantization: the codes are the ones the QAT forward
pass used (the family's ``encode`` of the current weight and scale), and ``step * code`` (minus
the blocks' mins for the asymmetric ggml families) is exactly the weight the QAT model computed with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import QATModelError
from ..expert_layout import linear_dims
from ..model.weights import get_qat_config, quantized_weights
from ..model.distributed import full_tensor
from ..model.lora import has_unmerged_adapters
from ..quantizers import Grid, MatrixView, Quantizer
from ..quantizers.block_scales import SCALE_DTYPES as BLOCK_SCALE_DTYPES
from ..quantizers.block_scales import STEP_DTYPE


@dataclass
class QuantizedLayer:
    """One quantized weight as the formats see it.

    Attributes:
        name: the weight's name: the module name of a Linear or Embedding ("model.layers.0.self_attn.q_proj"),
            ``<experts module>.<parameter>`` of a fused expert stack ("model.layers.0.mlp.experts.gate_up_proj").
        kind: "linear", "embedding" or "experts".
        codes: int8 ``[R, C]`` integer codes of ``grid``, of the weight's matrix (``view``).
        step: fp32 ``[R or 1, n_groups]``: the matrix is ``step * code`` (in fp32; minus ``ggml_scales.min`` for the
            asymmetric ggml families), cast to ``dtype``.
        grid, bits, method, group_size: the quantizer (``bits`` as configured, 1.58 for ternary).
        scale_dtype: what scales were rounded to in the forward pass (float8_e8m0fnu / float8_e4m3fn for
            the MXFP4 / NVFP4 block-scale formats).
        dtype: the weight's dtype.
        bias: the bias (linear layers), or None.
        activation_bits: 8 when the layer fake-quantized its input.
        tied_to: for an LM head that shares its weight with the input embedding, that module's name.
        weight_shape: the stored weight's shape (``[E, out, in]`` or ``[E, in, out]`` for experts).
        view: how the stored weight is seen as the ``[R, C]`` matrix of ``codes``
            (:class:`~hf_qat.quantizers.base.MatrixView`; a 2-D weight is its own matrix).
        family: the quantizer family (:class:`~hf_qat.quantizers.family.Quantizer`) the layer trained on.
        ggml_scales: a family's own block scales (:meth:`~hf_qat.quantizers.family.Quantizer.encode`: ggml's
            ``d``, ``sc``, mins; the matrix is ``step * code - min`` in fp32), or None.
        gguf_mix: the llama.cpp file type the model was trained for (``QATConfig.gguf_mix``), or None.
        embed_scale: what an embedding's forward multiplies the rows it looks up by (transformers' scaled word
            embeddings, Gemma 2 and 3: sqrt(hidden)), or None: a format that stores a plain embedding refuses it.
    """

    name: str
    kind: str
    codes: torch.Tensor
    step: torch.Tensor
    grid: Grid
    bits: float | int
    method: str
    group_size: int | str
    scale_dtype: torch.dtype
    dtype: torch.dtype
    bias: torch.Tensor | None
    activation_bits: int | None
    tied_to: str | None = None
    weight_shape: tuple[int, ...] = ()
    view: MatrixView = MatrixView()
    family: Quantizer | None = None
    ggml_scales: Any = None
    gguf_mix: str | None = None
    embed_scale: float | None = None

    @property
    def step_dtype(self) -> torch.dtype:
        """A dtype that holds every step exactly: the scale dtype, or bfloat16 for the FP8 block-scale
        formats (a step there is an FP8 value times powers of two)."""
        return STEP_DTYPE if self.scale_dtype in BLOCK_SCALE_DTYPES else self.scale_dtype

    @property
    def shape(self) -> tuple[int, int]:
        """The matrix shape ``[R, C]`` of ``codes``."""
        return tuple(self.codes.shape)

    def expert_codes_and_steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fused expert stack as ``(codes int8 [E, out, in], step fp32 [E, out, n_groups])``: each
        expert's matrix in the ``[out, in]`` layout of a Linear, whatever the stored layout."""
        experts, out, inp = linear_dims(self.weight_shape, self.view.transposed)
        codes = self.codes.reshape(experts, out, inp)  # the matrix rows are the experts' [out, in] rows
        step = self.step.reshape(experts, -1, self.step.shape[-1])
        if self.view.per_matrix:  # one step per expert matrix: the same for each of its rows
            step = step.expand(experts, out, 1)
        return codes.contiguous(), step.contiguous()


def _layer(name: str, qweight, weight: torch.Tensor, codes: torch.Tensor, step: torch.Tensor,
           ggml_scales: Any, bias: torch.Tensor | None, tied_to: str | None) -> QuantizedLayer:
    unit = qweight.weight_quantizer
    return QuantizedLayer(
        name=name, kind=qweight.kind, codes=codes.cpu(), step=step.cpu(), grid=unit.spec.grid,
        bits=unit.quantizer.bits, method=unit.quantizer.name, group_size=unit.group_size,
        scale_dtype=unit.spec.scale_dtype, dtype=weight.dtype,
        bias=bias, activation_bits=getattr(qweight.module, "activation_bits", None), tied_to=tied_to,
        weight_shape=tuple(weight.shape), view=unit.view, family=unit.quantizer,
        ggml_scales=None if ggml_scales is None else ggml_scales.map(torch.Tensor.cpu),
        gguf_mix=None if unit.config is None else unit.config.gguf_mix,
        embed_scale=None if getattr(qweight.module, "embed_scale", None) is None else float(qweight.module.embed_scale),
    )


def probe_layers(model: nn.Module) -> list[QuantizedLayer]:
    """The layers of a model just prepared for QAT as :func:`collect_layers` would give them were every
    scale initialised now (:meth:`~hf_qat.model.unit.WeightQuantizer.probe_codes`): what ``QATConfig.export_format``
    is checked against when the layers are installed, before the first step (biases included: BitNet and
    GGUF's NVFP4 refuse some)."""
    layers: list[QuantizedLayer] = []
    names_of_weight: dict[int, str] = {}
    for name, qweight in quantized_weights(model):
        weight = qweight.full_weight().detach()
        codes, step, ggml_scales = qweight.weight_quantizer.probe_codes(weight)
        bias = None if qweight.kind == "experts" else getattr(qweight.module, "bias", None)
        bias = None if bias is None else full_tensor(bias).detach().cpu()
        layers.append(_layer(name, qweight, weight, codes, step, ggml_scales, bias, names_of_weight.get(id(qweight.weight))))
        names_of_weight.setdefault(id(qweight.weight), name)
    return layers


def collect_layers(model: nn.Module, keep: bool = True) -> tuple[list[QuantizedLayer], dict[str, torch.Tensor]]:
    """The quantized layers of a QAT model, and its other tensors by state-dict key (QAT state,
    quantized weights and their biases excluded), on the CPU.

    Under FSDP2 call it on every rank: it all-gathers one tensor at a time. A rank with
    ``keep=False`` takes part in the gathers and keeps nothing (returns ``([], {})``), so only the
    writing rank ever holds the whole model, and the others at most one gathered tensor."""
    if get_qat_config(model) is None:
        raise QATModelError("the model has no QAT modules: export a model prepared by hf_qat (QATCallback, "
                            "prepare_model_for_qat or ptq)")
    if has_unmerged_adapters(model):
        raise QATModelError("the model holds unmerged PEFT adapters: call model.merge_and_unload() first "
                            "(lora_mode='merged' exports exactly), or export the base model and save the adapters with PEFT")
    layers: list[QuantizedLayer] = []
    names_of_weight: dict[int, str] = {}
    covered: set[str] = set()
    unit_prefixes: set[str] = set()
    for name, qweight in quantized_weights(model):
        if not (qweight.is_qat_active and qweight.weight_quantizer.is_initialized):
            raise QATModelError(
                f"{name} has not switched to QAT yet (the run ended before the switch step?): there is no "
                "trained low-bit weight to export. Train past the switch, or call hf_qat.ptq(model, cfg) to "
                "export a round-to-nearest model"
            )
        module = qweight.module
        if qweight.kind == "experts":
            covered.add(name)
            bias = None
        else:
            covered.update({f"{name}.weight", f"{name}.bias"})
            bias = getattr(module, "bias", None)
        unit_prefixes.add(qweight.unit_prefix)
        tied_to = names_of_weight.get(id(qweight.weight))
        unit = qweight.weight_quantizer
        weight = qweight.full_weight().detach()
        codes, step, ggml_scales = unit.encode(weight)
        bias = None if bias is None else full_tensor(bias).detach().cpu()
        names_of_weight.setdefault(id(qweight.weight), name)
        if not keep:
            continue
        layers.append(_layer(name, qweight, weight, codes, step, ggml_scales, bias, tied_to))
    others = {}
    for key, value in model.state_dict().items():
        if key in covered or key.startswith(tuple(unit_prefixes)):
            continue
        value = full_tensor(value).detach()
        if keep:
            others[key] = value.cpu()
    return layers, others
