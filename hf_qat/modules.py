"""QATLinear and QATEmbedding: layers that compute exactly their FP function until activated.

Each QAT layer keeps the ORIGINAL ``weight`` (and ``bias``) Parameter objects of the layer it
replaces, so optimizer state, tied weights and checkpoint keys survive installation. It adds:

* ``weight_scale``: the learnable scale Parameter (``scale shape``, the weight's dtype: FSDP2 needs
  one dtype per parameter group), absent for the non-learnable absmax family;
* ``qat_active`` and ``qat_initialized``: bool buffers, so the state is checkpointed and is the same
  on every rank. Python mirrors of them keep the forward pass free of device syncs.

Until ``qat_active`` the forward pass is ``F.linear`` / ``F.embedding`` with the original
parameters, bit for bit. After it, the weight goes through the fake quantizer (and, with
``activation_bits=8``, the input through int8 per-token fake quantization). Scales are initialised
from the full weight at the switch (``hf_qat.initialize_scales``, which the callback calls; a
single-process forward initialises lazily).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import bits_label
from .distributed import full_tensor, is_dtensor, world_size, write_full_
from .errors import QATModelError, QATRuntimeError
from .kernels import activation_fake_quant, weight_fake_quant
from .quantizers import Quantizer, ScaleLayout
from .quantizers.reference import WeightQuantSpec

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# nn.Embedding's configuration attributes (copied when a QATEmbedding replaces one, and back).
_EMBEDDING_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                    "scale_grad_by_freq", "sparse")


def scale_torch_dtype(name: str) -> torch.dtype:
    return _SCALE_DTYPES[name]


class QATWeightMixin:
    """The QAT state and behaviour shared by QATLinear and QATEmbedding (never used alone)."""

    weight: nn.Parameter
    weight_scale: nn.Parameter | None

    def _setup_qat(
        self,
        quantizer: Quantizer,
        group_size: int | str,
        scale_dtype: str,
        scale_grad_mode: str,
        name: str,
        shared_scale: nn.Parameter | None = None,
    ) -> None:
        layout = ScaleLayout(group_size)
        layout.check(self.weight.shape, name)
        self.qat_name = name
        self.quantizer = quantizer
        self.qat_layout = layout
        scale_shape = layout.scale_shape(self.weight.shape)
        self.qat_spec = WeightQuantSpec(
            grid=quantizer.grid(),
            group_size=group_size,
            scale_dtype=scale_torch_dtype(scale_dtype),
            grad_scale=quantizer.grad_scale(self.weight.numel(), scale_shape[0] * scale_shape[1], scale_grad_mode),
            learnable=quantizer.learnable,
        )
        if quantizer.learnable:
            if shared_scale is None:
                shared_scale = nn.Parameter(torch.ones(scale_shape, dtype=self.weight.dtype, device=self.weight.device))
            elif tuple(shared_scale.shape) != scale_shape:
                raise QATModelError(f"{name}: a shared scale must have shape {scale_shape}, got {tuple(shared_scale.shape)}")
            self.weight_scale = shared_scale
        else:
            self.register_parameter("weight_scale", None)
        self.register_buffer("qat_active", torch.zeros((), dtype=torch.bool, device=self.weight.device))
        self.register_buffer("qat_initialized", torch.zeros((), dtype=torch.bool, device=self.weight.device))
        self._qat_active = False
        self._qat_initialized = False
        # Modules that share this module's scale Parameter (a tied embedding and LM head); kept out of
        # the module tree.
        object.__setattr__(self, "_qat_scale_sharers", ())
        # A callable returning a tensor added to the weight before quantization (LoRA merged mode).
        object.__setattr__(self, "_qat_weight_delta", None)

    # ------------------------------------------------------------------ state
    @property
    def is_qat_active(self) -> bool:
        return self._qat_active

    @property
    def is_scale_initialized(self) -> bool:
        return self._qat_initialized

    def set_qat_active(self, active: bool) -> None:
        self._qat_active = bool(active)
        self.qat_active.fill_(self._qat_active)

    def _mark_initialized(self) -> None:
        for module in (self, *self._qat_scale_sharers):
            module._qat_initialized = True
            module.qat_initialized.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._qat_active = bool(self.qat_active.item())
        self._qat_initialized = bool(self.qat_initialized.item())

    # ------------------------------------------------------------------ the quantized weight
    def set_weight_delta(self, delta_fn) -> None:
        """Quantize ``weight + delta_fn()`` instead of ``weight`` (``delta_fn`` may return None)."""
        object.__setattr__(self, "_qat_weight_delta", delta_fn)

    def effective_weight(self) -> torch.Tensor:
        """The weight that gets quantized: the weight, plus the LoRA delta in merged mode."""
        delta = self._qat_weight_delta() if self._qat_weight_delta is not None else None
        return self.weight if delta is None else self.weight + delta

    def _full_effective_weight(self) -> torch.Tensor:
        delta = self._qat_weight_delta() if self._qat_weight_delta is not None else None
        weight = full_tensor(self.weight)
        return weight if delta is None else weight + full_tensor(delta)

    # ------------------------------------------------------------------ scales
    def compute_initial_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The family's first scale from the FULL ``weight`` (fp32, scale shape); raises on NaN/Inf."""
        w = weight.detach().float()
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise QATRuntimeError(
                f"{self.qat_name}: the weight holds {bad} NaN/Inf values at the QAT switch, so no scale can be "
                "initialised. The FP phase diverged: lower the learning rate or check the data"
            )
        return self.quantizer.init_scale(self.qat_layout.scale_view(w))

    def initialize_scale_(self) -> None:
        """Set ``weight_scale`` from the full weight (collective under FSDP2: call on every rank)."""
        if self.weight_scale is not None:
            write_full_(self.weight_scale, self.compute_initial_scale(self._full_effective_weight().detach()))
        self._mark_initialized()

    def current_scale(self) -> torch.Tensor:
        """The scale the forward pass uses: the learnable Parameter, or (absmax) the one recomputed
        from the current weight."""
        if self.weight_scale is not None:
            return self.weight_scale
        return self.quantizer.init_scale(self.qat_layout.scale_view(self.effective_weight().detach().float()))

    def fake_quantized_weight(self) -> torch.Tensor:
        """The weight as the QAT forward pass sees it (differentiable w.r.t. weight and scale)."""
        if not self._qat_initialized:
            self._initialize_in_forward()
        return weight_fake_quant(self.effective_weight(), self.current_scale(), self.qat_spec)

    def _initialize_in_forward(self) -> None:
        if world_size() > 1 or is_dtensor(self.weight):
            raise QATRuntimeError(
                f"{self.qat_name}: scales are not initialised. Under distributed training call "
                "hf_qat.initialize_scales(model) on every rank after activating QAT (QATCallback does this)"
            )
        self.initialize_scale_()

    def qat_extra_repr(self) -> str:
        group = self.qat_layout.group_size
        return (
            f"bits={bits_label(self.quantizer.bits)}, method={self.quantizer.name}, group_size={group}, "
            f"active={self._qat_active}"
        )


class QATLinear(QATWeightMixin, nn.Linear):
    """nn.Linear trained on a low-bit grid once active. Build with :meth:`from_linear`."""

    activation_bits: int | None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quantizer: Quantizer,
        *,
        group_size: int | str,
        scale_dtype: str = "float16",
        scale_grad_mode: str = "paretoq",
        activation_bits: int | None = None,
        name: str = "",
        shared_scale: nn.Parameter | None = None,
    ) -> "QATLinear":
        """A QATLinear holding ``linear``'s own weight and bias Parameters (no copy)."""
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
        module._setup_qat(quantizer, group_size, scale_dtype, scale_grad_mode, name, shared_scale)
        module.train(linear.training)
        return module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._qat_active:
            return F.linear(input, self.weight, self.bias)
        if self.activation_bits is not None:
            input = activation_fake_quant(input)
        return F.linear(input, self.fake_quantized_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the same weight and bias Parameters (scales dropped)."""
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
        return f"{nn.Linear.extra_repr(self)}, {self.qat_extra_repr()}{act}"


class QATEmbedding(QATWeightMixin, nn.Embedding):
    """nn.Embedding whose table is trained on a low-bit grid once active (rows = tokens, groups
    along the embedding dim). Build with :meth:`from_embedding`."""

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        quantizer: Quantizer,
        *,
        group_size: int | str,
        scale_dtype: str = "float16",
        scale_grad_mode: str = "paretoq",
        name: str = "",
    ) -> "QATEmbedding":
        if embedding.max_norm is not None or embedding.sparse:
            raise QATModelError(f"{name}: embeddings with max_norm or sparse gradients cannot be quantized by hf_qat")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in _EMBEDDING_ATTRS:
            setattr(module, attr, getattr(embedding, attr))
        module.weight = embedding.weight
        module._setup_qat(quantizer, group_size, scale_dtype, scale_grad_mode, name)
        module.train(embedding.training)
        return module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.fake_quantized_weight() if self._qat_active else self.weight
        return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def to_embedding(self) -> nn.Embedding:
        embedding = nn.Embedding.__new__(nn.Embedding)
        nn.Module.__init__(embedding)
        for attr in _EMBEDDING_ATTRS:
            setattr(embedding, attr, getattr(self, attr))
        embedding.weight = self.weight
        embedding.train(self.training)
        return embedding

    def extra_repr(self) -> str:
        return f"{nn.Embedding.extra_repr(self)}, {self.qat_extra_repr()}"


QAT_MODULE_TYPES = (QATLinear, QATEmbedding)
