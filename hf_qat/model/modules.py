"""QATLinear and QATEmbedding: thin layers that compute exactly their FP function until activated.

Each QAT layer keeps the ORIGINAL ``weight`` (and ``bias``) Parameter objects of the layer it
replaces, so optimizer state, tied weights and checkpoint keys survive installation, and holds one
:class:`hf_qat.model.unit.WeightQuantizer` (``weight_quantizer``: scale, switch state, fake quant, codes,
error). A tied embedding and LM head hold the same unit.

Until the unit is active the forward pass is ``F.linear`` / ``F.embedding`` with the original
parameters, bit for bit. Once it is active, the weight goes through the unit's fake quantizer (and,
with ``activation_bits=8``, the input through int8 per-token fake quantization). The units are built
by ``hf_qat.model.convert`` (one per weight) and handed in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QATModelError
from ..kernels import activation_fake_quant
from .unit import WeightQuantizer, recomputed_in_backward, upgrade_state_dict

# nn.Embedding's configuration attributes (copied when a QATEmbedding replaces one, and back).
_EMBEDDING_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                    "scale_grad_by_freq", "sparse")


def embedding_scale(embedding: nn.Embedding, name: str = "", advice: str = "") -> torch.Tensor | None:
    """What ``embedding``'s forward multiplies the rows it looks up by: None for nn.Embedding's own forward; the
    one-element ``embed_scale`` of transformers' scaled word embeddings (Gemma 2 and 3: ``rows *
    embed_scale.to(weight dtype)``, sqrt(hidden)), checked on the module's own output. Raises QATModelError for
    an embedding hf_qat cannot quantize: max_norm or sparse gradients, any other forward, which hf_qat could not
    reproduce (ending with ``advice``), and the meta device, where nothing can be checked (``name``: the
    module's, for the messages)."""
    if embedding.max_norm is not None or embedding.sparse:
        raise QATModelError(f"{name}: embeddings with max_norm or sparse gradients cannot be quantized by hf_qat")
    if type(embedding).forward is nn.Embedding.forward:
        return None
    scale = getattr(embedding, "embed_scale", None)
    weight = embedding.weight
    kind = f"{name + ': ' if name else ''}{type(embedding).__module__}.{type(embedding).__qualname__}"
    if weight.is_meta or (isinstance(scale, torch.Tensor) and scale.is_meta):
        raise QATModelError(f"{kind} overrides nn.Embedding.forward and is on the meta device, where what it computes "
                            "cannot be checked: prepare the model for QAT once its weights are loaded")
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        with torch.no_grad():
            ids = torch.arange(min(8, embedding.num_embeddings), device=weight.device)
            rows = F.embedding(ids, weight, embedding.padding_idx) * scale.to(weight.dtype)
            if torch.equal(embedding(ids), rows):
                return scale
    raise QATModelError(f"{kind} overrides nn.Embedding.forward with something other than looking rows up and "
                        f"multiplying them by its embed_scale{advice}")


class QATWeightMixin:
    """What QATLinear and QATEmbedding share: the unit of their ``weight`` (never used alone)."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer

    @property
    def is_qat_active(self) -> bool:
        return self.weight_quantizer.is_active

    @property
    def qat_name(self) -> str:
        return self.weight_quantizer.name

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        upgrade_state_dict(state_dict, prefix)  # checkpoints of hf_qat 0.1.0
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QATLinear(QATWeightMixin, nn.Linear):
    """nn.Linear trained on a low-bit grid once active. Build with :meth:`from_linear`."""

    activation_bits: int | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, unit: WeightQuantizer, *, activation_bits: int | None = None) -> "QATLinear":
        """A QATLinear holding ``linear``'s own weight and bias Parameters (no copy) and ``unit`` (for a
        head tied to the embedding: the embedding's unit)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features = linear.in_features
        module.out_features = linear.out_features
        module.weight = linear.weight
        if linear.bias is None:
            module.register_parameter("bias", None)
        else:
            module.bias = linear.bias
        module.activation_bits = activation_bits
        module.weight_quantizer = unit
        module.train(linear.training)
        return module

    def forward(self, input: torch.Tensor, weight_delta: torch.Tensor | None = None) -> torch.Tensor:
        """``weight_delta``: added to the weight before quantization (LoRA merged mode)."""
        if not self.weight_quantizer.is_active:
            return F.linear(input, self.weight, self.bias)
        recipes = []
        if self.activation_bits is not None:
            source, input = input, activation_fake_quant(input)
            recipes.append((input, lambda: _requantized_input(source), (source,)))
        weight = self.weight if weight_delta is None else self.weight + weight_delta
        quantized = self.weight_quantizer.fake_quantize(weight)
        recipes.append(self.weight_quantizer.recipe(quantized, weight))
        with recomputed_in_backward(*recipes):  # neither is kept for the backward: both are made again there
            return F.linear(input, quantized, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the same weight and bias Parameters (the unit dropped)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = self.weight
        if self.bias is None:
            linear.register_parameter("bias", None)
        else:
            linear.bias = self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        act = f", activation_bits={self.activation_bits}" if self.activation_bits else ""
        return f"{nn.Linear.extra_repr(self)}{act}"


@torch.no_grad()
def _requantized_input(source: torch.Tensor) -> torch.Tensor:
    """The int8 fake quant of a Linear's input again, outside autograd (the same bits)."""
    return activation_fake_quant(source)


class QATEmbedding(QATWeightMixin, nn.Embedding):
    """nn.Embedding whose table is trained on a low-bit grid once active (rows = tokens, groups
    along the embedding dim). Build with :meth:`from_embedding`."""

    embed_scale: torch.Tensor | None

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, unit: WeightQuantizer) -> "QATEmbedding":
        """A QATEmbedding holding ``embedding``'s own table Parameter (no copy) and ``unit``; a scaled word
        embedding (:func:`embedding_scale`) keeps its ``embed_scale``, which multiplies the (fake-quantized)
        rows, and :meth:`to_embedding` gives its class back."""
        scale = embedding_scale(embedding, unit.name)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in _EMBEDDING_ATTRS:
            setattr(module, attr, getattr(embedding, attr))
        module.embedding_class = type(embedding)
        # the class's own settings (Gemma's scalar_embed_scale), given back by to_embedding
        module.embedding_extras = {k: v for k, v in vars(embedding).items()  # not methods a hook set (accelerate's)
                                   if not k.startswith("_") and k not in (*_EMBEDDING_ATTRS, "training") and not callable(v)}
        module.register_buffer("embed_scale", scale,
                               persistent="embed_scale" not in embedding._non_persistent_buffers_set)
        module.weight = embedding.weight
        module.weight_quantizer = unit
        module.train(embedding.training)
        return module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        unit = self.weight_quantizer
        if not unit.is_active:
            rows = self._lookup(input, self.weight)
        else:
            rows = unit.fake_quantize_rows(self.weight, lambda table: self._lookup(input, table), input.numel())
        return rows if self.embed_scale is None else rows * self.embed_scale.to(self.weight.dtype)

    def _lookup(self, input: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)

    def to_embedding(self) -> nn.Embedding:
        """The embedding this one replaced, of its own class (nn.Embedding, or a scaled word embedding with its
        ``embed_scale``), holding the same table Parameter."""
        embedding = self.embedding_class.__new__(self.embedding_class)
        nn.Module.__init__(embedding)
        for attr in _EMBEDDING_ATTRS:
            setattr(embedding, attr, getattr(self, attr))
        for attr, value in self.embedding_extras.items():
            setattr(embedding, attr, value)
        if self.embed_scale is not None:
            embedding.register_buffer("embed_scale", self.embed_scale,
                                      persistent="embed_scale" not in self._non_persistent_buffers_set)
        embedding.weight = self.weight
        embedding.train(self.training)
        return embedding


QAT_MODULE_TYPES = (QATLinear, QATEmbedding)
