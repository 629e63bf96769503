"""Low-bit layers of the native format: packed integer codes + steps, dequantized in the forward pass.

A layer's weight is ``code_table[u] * step`` (fp32) cast to the compute dtype, where ``u`` are the
packed code indices (``hf_qat.kernels.pack`` layout) and ``step`` the per-group steps: exactly the weight
the QAT model computed with. Dequantization goes through ``hf_qat.kernels.dequantize_packed`` (a Triton
kernel on CUDA, PyTorch elsewhere).

Buffers are named like the checkpoint keys (``weight_packed``, ``weight_step``), so transformers fills
them when it loads a checkpoint. A fused expert stack ``<experts>.<P>`` is stored as the PackedWeight
child ``<experts>.<P>_packed`` of its experts module, whose class becomes ``Packed<class>``: its forward
puts the dequantized stack where transformers' experts implementations read ``P``.

Importing this module registers :func:`unpack_packed_layers` as a restorer of
``hf_qat.model.convert.prepare_model_for_qat``, which so turns a loaded native checkpoint back into trainable
layers without depending on the exporter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import torch_dtype
from ..errors import QATModelError
from ..kernels import activation_fake_quant, dequantize_packed
from ..kernels.pack import packed_bytes_per_row
from ..model.convert import register_restorer
from ..model.experts import mixed_class, substituted_parameters
from ..quantizers import MatrixView

PACKED_SUFFIX = "_packed"  # the packed child of fused expert stack P is P_packed


def index_bits(n_codes: int) -> int:
    """Bits per stored index for a code table of ``n_codes`` entries."""
    return max(1, math.ceil(math.log2(n_codes)))


class PackedWeight(nn.Module):
    """The packed weight of one layer and its dequantization (shared by the layer types below, and
    the child of a packed experts module for each fused stack).

    ``spec`` is the layer's entry of the native ``quantization_config["modules"]``: ``shape`` is the
    ``[R, C]`` matrix of the codes; for an expert stack ``weight_shape`` is its stored shape and
    ``transposed`` / ``per_matrix`` its :class:`~hf_qat.quantizers.base.MatrixView`.
    """

    def __init__(self, spec: dict[str, Any], dtype: torch.dtype, device=None) -> None:
        super().__init__()
        rows, cols = spec["shape"]
        self.rows, self.cols = rows, cols
        self.weight_shape = tuple(spec.get("weight_shape", spec["shape"]))
        self.view = MatrixView(transposed=bool(spec.get("transposed")), per_matrix=bool(spec.get("per_matrix")))
        self.code_table = tuple(float(c) for c in spec["codes"])
        self.storage_bits = index_bits(len(self.code_table))
        if spec.get("storage_bits", self.storage_bits) != self.storage_bits:
            raise QATModelError(f"storage_bits {spec['storage_bits']} does not fit a table of {len(self.code_table)} codes")
        self.compute_dtype = dtype
        self.activation_bits = spec.get("activation_bits")
        self.register_buffer("weight_packed", torch.empty(
            (rows, packed_bytes_per_row(cols, self.storage_bits)), dtype=torch.uint8, device=device))
        self.register_buffer("weight_step", torch.empty(tuple(spec["scale_shape"]), dtype=torch_dtype(spec["scale_dtype"]),
                                                        device=device))
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = torch.tensor(self.code_table, dtype=torch.float32, device=device)
        return self._tables[device]

    def dequantize(self) -> torch.Tensor:
        """The dense ``[rows, cols]`` weight in the compute dtype."""
        packed = self.weight_packed
        return dequantize_packed(packed, self.storage_bits, self.cols, self._table(packed.device), self.weight_step,
                                 self.compute_dtype)

    def stored_weight(self) -> torch.Tensor:
        """The dense weight in its stored layout (``weight_shape``) and the compute dtype."""
        return self.view.from_matrix(self.dequantize(), self.weight_shape)

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, {len(self.code_table)} codes in {self.storage_bits} bits"


class PackedLinear(PackedWeight):
    """nn.Linear with a packed low-bit weight (and int8 per-token activations when trained so)."""

    def __init__(self, spec: dict[str, Any], dtype: torch.dtype, device=None) -> None:
        super().__init__(spec, dtype, device)
        self.in_features, self.out_features = self.cols, self.rows
        if spec.get("bias"):
            self.bias = nn.Parameter(torch.empty(self.rows, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is not None:
            input = activation_fake_quant(input)
        return F.linear(input, self.dequantize(), self.bias)


class PackedEmbedding(PackedWeight):
    """nn.Embedding with a packed low-bit table."""

    def __init__(self, spec: dict[str, Any], dtype: torch.dtype, device=None, padding_idx: int | None = None) -> None:
        super().__init__(spec, dtype, device)
        self.num_embeddings, self.embedding_dim = self.rows, self.cols
        self.padding_idx = padding_idx

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.dequantize(), self.padding_idx)


class TiedPackedHead(nn.Module):
    """An LM head that shares the packed table of the input embedding (stored once)."""

    def __init__(self, embedding: PackedEmbedding, bias: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: its tensors belong to the embedding
        self.in_features, self.out_features = embedding.cols, embedding.rows
        self.bias = nn.Parameter(torch.empty(embedding.rows, dtype=dtype, device=device)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.embedding.dequantize(), self.bias)


class PackedExperts(nn.Module):
    """Mixed into a fused experts class (:func:`hf_qat.model.experts.mixed_class`): each fused stack ``P`` lives
    packed in the child ``P_packed`` and is dequantized for the forward. ``experts_class`` is the
    original class."""

    experts_class: type[nn.Module]

    def packed_weights(self) -> dict[str, PackedWeight]:
        """``parameter name -> its packed child``."""
        return {name[: -len(PACKED_SUFFIX)]: child for name, child in self.named_children()
                if isinstance(child, PackedWeight) and name.endswith(PACKED_SUFFIX)}

    def forward(self, *args, **kwargs):
        dense = {name: packed.stored_weight() for name, packed in self.packed_weights().items()}
        with substituted_parameters(self, dense):
            return super().forward(*args, **kwargs)


def _pack_expert_stack(model: nn.Module, name: str, spec: dict[str, Any], dtype: torch.dtype) -> None:
    """Replace the fused Parameter ``name`` (``<experts>.<P>``) by its packed child ``P_packed``."""
    module_name, _, parameter = name.rpartition(".")
    experts = model.get_submodule(module_name)
    weight = experts._parameters.get(parameter)
    if weight is None or tuple(weight.shape) != tuple(spec["weight_shape"]):
        raise QATModelError(
            f"the hf_qat quantization_config says {name} is a fused expert stack {tuple(spec['weight_shape'])}, but the "
            f"model's is {None if weight is None else tuple(weight.shape)}: config and model disagree"
        )
    del experts._parameters[parameter]
    if not isinstance(experts, PackedExperts):
        experts.__class__ = mixed_class(PackedExperts, type(experts), "Packed")
    experts.add_module(parameter + PACKED_SUFFIX, PackedWeight(spec, dtype, weight.device))
    # transformers' _init_weights would initialise the (now packed) stack by name; everything this module
    # holds comes from the checkpoint, which the quantizer checks after loading.
    experts._is_hf_initialized = True


def replace_with_packed(model: nn.Module, modules: dict[str, dict[str, Any]], dtype: torch.dtype) -> None:
    """Swap the layers named in ``modules`` (the native quantization_config) for packed ones, checking
    that each exists with the shape the config records."""
    names = dict(model.named_modules())
    built: dict[str, PackedEmbedding] = {}
    for name, spec in sorted(modules.items(), key=lambda item: item[1].get("tied_to") is not None):
        if spec["kind"] == "experts":
            _pack_expert_stack(model, name, spec, dtype)
            continue
        if name not in names:
            raise QATModelError(f"the hf_qat quantization_config names {name}, which this model does not have")
        old = names[name]
        weight = getattr(old, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(spec["shape"]):
            raise QATModelError(
                f"the hf_qat quantization_config says {name} is {tuple(spec['shape'])}, but the model's layer is "
                f"{None if weight is None else tuple(weight.shape)}: config and model disagree"
            )
        device = weight.device
        if spec.get("tied_to"):
            new: nn.Module = TiedPackedHead(built[spec["tied_to"]], bool(spec.get("bias")), dtype, device)
        elif spec["kind"] == "embedding":
            new = built[name] = PackedEmbedding(spec, dtype, device, getattr(old, "padding_idx", None))
        else:
            new = PackedLinear(spec, dtype, device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _unpack_experts(model: nn.Module, steps: dict[str, torch.Tensor]) -> None:
    """Packed experts modules back to their class, each fused stack a trainable Parameter again."""
    for module_name, experts in list(model.named_modules()):
        if not isinstance(experts, PackedExperts):
            continue
        for parameter, packed in experts.packed_weights().items():
            steps[f"{module_name}.{parameter}"] = packed.weight_step.detach().float().clone()
            delattr(experts, parameter + PACKED_SUFFIX)
            experts.register_parameter(parameter, nn.Parameter(packed.stored_weight().detach().contiguous()))
        experts.__class__ = experts.experts_class


@register_restorer
def unpack_packed_layers(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Turn the packed layers of a loaded native checkpoint back into plain nn.Linear / nn.Embedding /
    fused experts holding the dequantized weights (trainable, exactly what the packed model computed
    with), and clear the model's quantization marks. Returns ``(qat_config dict, steps by weight
    name)``, or None when the model holds no packed layers."""
    packed = {name: m for name, m in model.named_modules()
              if isinstance(m, (PackedLinear, PackedEmbedding, TiedPackedHead))}
    has_experts = any(isinstance(m, PackedExperts) for m in model.modules())
    if not packed and not has_experts:
        return None
    quantization_config = getattr(model.config, "quantization_config", None)
    qat_config = (quantization_config.qat_config if hasattr(quantization_config, "qat_config")
                  else (quantization_config or {}).get("qat_config", {}))
    steps: dict[str, torch.Tensor] = {}
    _unpack_experts(model, steps)
    plain: dict[str, nn.Module] = {}
    for name, module in sorted(packed.items(), key=lambda item: isinstance(item[1], TiedPackedHead)):
        if isinstance(module, TiedPackedHead):
            source = next(n for n, m in packed.items() if m is module.embedding)
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device="meta")
            new.weight = plain[source].weight
            if module.bias is not None:
                new.bias = module.bias
        else:
            weight = nn.Parameter(module.dequantize().detach().clone())
            steps[name] = module.weight_step.detach().float().clone()
            if isinstance(module, PackedEmbedding):
                new = nn.Embedding(module.rows, module.cols, padding_idx=module.padding_idx, device="meta")
            else:
                new = nn.Linear(module.cols, module.rows, bias=module.bias is not None, device="meta")
                if module.bias is not None:
                    new.bias = module.bias
            new.weight = weight
        plain[name] = new
    for name, new in plain.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if any(isinstance(m, TiedPackedHead) for m in packed.values()):
        model.config.tie_word_embeddings = True
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return qat_config, steps
