"""QATConfig: what to quantize, how, and when to switch from full precision to QAT.

Every field is validated when the config is built; an error names the field, the value it got and
the values it allows. ``to_dict`` / ``from_dict`` / ``to_json_string`` / ``save_pretrained`` /
``from_pretrained`` round-trip the config (the callback writes ``qat_config.json`` into the trainer's
output dir and every checkpoint). ``QATConfig.from_preset(name)`` gives the settings of
:data:`PRESETS`, each one matching an export format exactly (docs/formats.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Union

from .bits import ALLOWED_BITS, TERNARY_BITS, bits_label, normalize_bits  # noqa: F401  (re-exported)
from .dtypes import DTYPES
from .errors import QATConfigError
from .export_formats import FORMATS
from .llamacpp.file_types import DEFAULT_TYPE, UNTRAINABLE
from .llamacpp.file_types import MIXES as FILE_TYPES
from .schedule import DECAY_SHAPES

ALLOWED_GROUP_STRINGS = ("channel", "tensor")
# The one table of the fields that take one of a few names.
CHOICES = {
    "scale_dtype": (*DTYPES, "auto"),
    "scale_grad_mode": ("paretoq", "lsq"),
    "decay_shape": DECAY_SHAPES,
    "strategy": ("paper", "law"),
    "lora_mode": ("merged", "base"),
    "scale_init": ("max", "mse"),
    "moe_params": ("total", "active"),
}
ALLOWED_SCALE_DTYPES = CHOICES["scale_dtype"]
ALLOWED_DECAY_SHAPES = CHOICES["decay_shape"]
BOOL_FIELDS = ("fuse_cooldown", "reset_optimizer_state", "log_quant_error", "manage_schedule",
               "count_quantized_params_only")
MAX_GROUP_SIZE = 1 << 16
DEFAULT_SCALE_LR = 0.02  # the scales' peak LR when neither scale_lr nor scale_lr_multiplier is set
CONFIG_NAME = "qat_config.json"

GroupSize = Union[int, str]
Start = Union[str, int, float]


SNAPSHOT_TEACHERS = ("switch", "initial")
DISTILL_KEYS = ("teacher", "weight", "temperature", "teacher_dtype", "top_k")
# What a saved config holds in place of an nn.Module teacher: the module itself is not serialisable,
# so a config read back from JSON names it and a run built from that config must be given the module.
MODULE_TEACHER = "nn.Module"


@dataclass(frozen=True)
class DistillConfig:
    """The ``distill`` field of QATConfig (keys are the contract: add, never rename).

    ``teacher``: "switch" (an FP snapshot at the switch), "initial" (one of the model as given), a model
    id or path, an ``nn.Module``, or ``"nn.Module"`` (read back from a saved config whose teacher was a
    module: valid to read and export, but training needs the module itself).
    """

    teacher: Any = "switch"
    weight: float = 0.5
    temperature: float = 1.0
    teacher_dtype: str | None = None
    top_k: int | None = None

    @classmethod
    def from_value(cls, value: Any) -> "DistillConfig | None":
        """None, a DistillConfig or a dict of its keys -> a validated DistillConfig (or None)."""
        if value is None or isinstance(value, DistillConfig):
            return value
        if not isinstance(value, dict):
            raise QATConfigError("distill", value, "None or a dict with keys " + ", ".join(DISTILL_KEYS))
        unknown = sorted(set(value) - set(DISTILL_KEYS), key=str)
        if unknown:
            raise QATConfigError(f"distill.{unknown[0]}", value[unknown[0]], "keys " + ", ".join(DISTILL_KEYS))
        config = cls(**value)
        config.check()
        return config

    def check(self) -> None:
        from torch import nn

        teacher = self.teacher
        if not isinstance(teacher, (str, nn.Module)) or (isinstance(teacher, str) and not teacher):
            raise QATConfigError("distill.teacher", teacher, "'switch', 'initial', a model id or path, or an nn.Module")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0.0 <= self.weight <= 1.0:
            raise QATConfigError("distill.weight", self.weight, "a number in [0, 1]")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise QATConfigError("distill.temperature", self.temperature, "a finite number > 0")
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            raise QATConfigError("distill.teacher_dtype", self.teacher_dtype, "None, " + ", ".join(DTYPES))
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise QATConfigError("distill.top_k", self.top_k, "None or an int >= 1")

    def to_dict(self) -> dict[str, Any]:
        teacher = self.teacher if isinstance(self.teacher, str) else MODULE_TEACHER
        return {"teacher": teacher, "weight": self.weight, "temperature": self.temperature,
                "teacher_dtype": self.teacher_dtype, "top_k": self.top_k}


def _check_name_list(field_name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise QATConfigError(field_name, value, "None, a module name / regex, or a non-empty list of them")
    return list(value)


@dataclass
class QATConfig:
    """Quantization-aware training settings (the names and meanings are the public contract).

    Args:
        bits: weight bit width: 1, 1.58 (or "ternary"), 2, 3, 4, 5, 6, 8.
        method: "auto" (binary for 1 bit, seq for ternary and 2 bits, lsq for 3..8), or a registered
            quantizer: "lsq", "seq", "binary", "absmax" (the non-learnable round-to-nearest baseline),
            "mxfp4" (4 bits: FP4 E2M1 in blocks of 32 with E8M0 scales) or "nvfp4" (4 bits: E2M1 in blocks
            of 16 with E4M3 scales and a per-tensor FP32 scale).
        group_size: scales per group of this many consecutive input columns (a power of two), or
            "channel" (one scale per output row), or "tensor" (one scale per weight matrix). None (the
            default): 32, or the block of a block-scaled format (mxfp4: 32, nvfp4: 16), which takes no
            other group size.
        target_modules: None = every nn.Linear except the LM head; else a list of module names,
            name suffixes ("q_proj") or regexes (full match) selecting nn.Linear modules.
        exclude_modules: names/suffixes/regexes removed from the targets.
        embedding_bits: also quantize the input embedding and the LM head (kept tied when tied).
        embedding_method: quantizer for the embeddings; "auto" = lsq, and needs embedding_bits >= 4.
        activation_bits: 8 = int8 per-token dynamic activation fake-quant on the targeted Linears.
        start: "auto" (the planner chooses), an int (the optimizer step at which QAT starts), or a
            float in (0, 1] (the QAT fraction f: QAT starts at step round((1 - f) * max_steps)).
        pretrained_tokens: tokens the checkpoint was already trained on in full precision (the
            planner counts them as FP tokens).
        fuse_cooldown: use the paper's fused schedule (LR stays at its stable value until the switch,
            then decays over the QAT phase); False gives the classic schedule.
        scale_dtype: scales are rounded to this dtype in the forward pass (exact export): "float16",
            "bfloat16", "float32", or "auto" (each weight's dtype when it is bfloat16, else float16). None (the
            default): "auto" with ``export_format="compressed-tensors"`` (which stores scales in the weights'
            dtype, so a bf16 model needs bf16 scales), "float16" otherwise (what GGUF's blocks hold). The
            block-scaled formats (mxfp4, nvfp4) round to their own scale formats; when every family in
            use is one of them, only the default "float16" is accepted (with an integer family beside
            one, e.g. an LSQ embedding_method, scale_dtype applies to that family).
        scale_lr_multiplier: when set, the scales' learning rate is the base LR times this (the rule
            of hf_qat 0.1 / 0.2, whose default was 10). None (default): ``scale_lr``.
        scale_lr: the scales' peak learning rate, whatever the base LR (None: 0.02, ``DEFAULT_SCALE_LR``,
            unless ``scale_lr_multiplier`` is set; setting both is an error). The learned parameter is
            log(scale / initial scale), so Adam moves a scale by about this fraction of itself per
            step, a rate that does not depend on the weights' size or LR. The scales follow the
            same schedule shape as the weights. Chosen from two regimes: from scratch (demo, planned
            2-bit, base LR 3e-3) held-out loss 2.8127 / 2.8031 / 2.8048 / 2.8099 at scale LRs 3e-3 / 2e-2 /
            3e-2 / 9e-2; fine-tuning SmolLM2-135M at 4 bits (base LR 2e-5, benchmarks/distill.py) 2.1984 /
            2.1710 / 2.1619 / 2.2162 at 2e-4 / 2e-3 / 2e-2 / 6e-2: a multiplier that suits one regime
            is 100 x off in the other, an absolute rate of about 0.02 suits both.
        reset_optimizer_state: clear the optimizer state of the quantized weights at the switch.
        scale_grad_mode: "paretoq" (g = 1/sqrt(numel(W) * Qp)) or "lsq" (g = 1/sqrt(n_per_scale * Qp)).
        log_quant_error: log ``qat/weight_error`` (mean relative squared quantization error).
        decay_shape: shape of the LR decay: "linear", "cosine" or "1-sqrt".
        min_lr_ratio: the LR decays to ``min_lr_ratio * learning_rate``.
        fp_cooldown_fraction: classic schedule only: the FP cooldown takes this fraction of the FP steps.
        qat_warmup_fraction: classic schedule only: the QAT re-warmup takes this fraction of QAT steps.
        manage_schedule: let the callback install the LR schedule (True by default; False keeps the
            Trainer's ``lr_scheduler_type``).
        strategy: how start="auto" chooses the fraction: "paper" (the fitted formula of
            arXiv 2509.22935) or "law" (minimise a fitted loss law, ``law_path``).
        law_path: a fitted law JSON (``hf-qat fit``) for strategy="law" and predicted losses (QATCallback
            refuses a path that does not exist when it is built; a saved config reads back without it).
        sequence_length: tokens per training example, for the planner's tokens per step (default:
            the length of the first training example's input_ids).
        count_quantized_params_only: the planner's N counts only the quantized weights (default:
            every parameter, tied tensors once).
        lora_mode: with PEFT LoRA: "merged" fake-quantizes W + the adapters' delta (merge_and_unload
            then exports exactly), "base" only the frozen base weight (adapters stay full precision).
        distill: distillation from a full-precision teacher in the QAT phase (see
            :class:`DistillConfig`): {"teacher", "weight", "temperature", ...}.
        scale_init: the scales at the switch: "max" (the family's rule, e.g. max|w| / Qp) or "mse"
            (that scale times the clipping ratio in 0.30..1.00 of least squared error per group);
            learnable families only. On SmolLM2-135M at 4 bits, g32: PTQ 2.368 (max) vs 2.360 (mse),
            after 60 QAT steps 2.1619 vs 2.1643, so "max" stays the default.
        moe_params: for a mixture of experts, the N of the planner's tokens per parameter byte: "total"
            (every parameter, what memory holds; default) or "active" (the parameters one token uses).
            The plan states both.
        gguf_mix: None, or a llama.cpp quantization mix: "q4_k_m", "q4_k_s", "q5_k_m" or "q6_k". Every weight,
            the embedding and LM head included, then trains on the GGML type llama.cpp's quantizer gives
            its tensor in that mix (:mod:`hf_qat.model.file_type`: Q6_K for the output and some attn_v / ffn_down
            layers, Q5_0 / Q5_1 / Q8_0 where rows are not a multiple of 256, ...), so the GGUF export is
            the file ``llama-quantize`` would write, tensor by tensor. ``bits`` / ``method`` must be the
            mix's base type (the presets of the same names set them) and ``embedding_bits`` unset.
        export_format: None, or the format the run will be exported to: "compressed-tensors", "gguf",
            "bitnet" or "hf-qat" (the registered formats). The QAT layers are checked against it when they are
            installed (before the first step), and the default ``scale_dtype`` follows it.
    """

    bits: float | int | str = 4
    method: str = "auto"
    group_size: GroupSize | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    embedding_bits: float | int | str | None = None
    embedding_method: str = "auto"
    activation_bits: int | None = None
    start: Start = "auto"
    pretrained_tokens: float | int | None = None
    fuse_cooldown: bool = True
    scale_dtype: str | None = None
    scale_lr_multiplier: float | None = None
    reset_optimizer_state: bool = False
    scale_grad_mode: str = "paretoq"
    log_quant_error: bool = True
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0
    fp_cooldown_fraction: float = 0.2
    qat_warmup_fraction: float = 0.05
    manage_schedule: bool = True
    strategy: str = "paper"
    law_path: str | None = None
    sequence_length: int | None = None
    count_quantized_params_only: bool = False
    lora_mode: str = "merged"
    distill: dict[str, Any] | None = None
    scale_init: str = "max"
    scale_lr: float | None = None
    moe_params: str = "total"
    gguf_mix: str | None = None
    export_format: str | None = None

    def __post_init__(self) -> None:
        self._fold_case()
        self._adopt_gguf_mix()
        self._check_quantizers()
        self._check_export_format()
        self.group_size = self._check_group_size(self._default_group_size() if self.group_size is None
                                                 else self.group_size)
        self._check_block_formats()
        self.target_modules = _check_name_list("target_modules", self.target_modules)
        self.exclude_modules = _check_name_list("exclude_modules", self.exclude_modules)
        if self.activation_bits is not None and (isinstance(self.activation_bits, bool) or self.activation_bits != 8):
            raise QATConfigError("activation_bits", self.activation_bits, "None or 8 (int8 per-token dynamic)")
        self.activation_bits = None if self.activation_bits is None else 8
        self.start = self._check_start(self.start)
        self.pretrained_tokens = self._check_pretrained_tokens(self.pretrained_tokens)
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise QATConfigError(name, getattr(self, name), "True or False")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise QATConfigError(name, getattr(self, name), ", ".join(allowed))
        self._check_numbers()
        self._check_distill()
        self._check_gguf_mix()
        if self.scale_init == "mse" and not self._learnable_families():
            raise QATConfigError("scale_init", "mse", "'max' with method='absmax' (its scale is recomputed from "
                                 "the weight every step, so there is no first scale to search)")
        if self.law_path is not None and (not isinstance(self.law_path, (str, os.PathLike)) or not self.law_path):
            raise QATConfigError("law_path", self.law_path, "None or the path of a fitted law JSON")
        if self.strategy == "law" and self.law_path is None:
            raise QATConfigError("law_path", None, "the path of a fitted law JSON when strategy='law'")

    # ------------------------------------------------------------------ validation helpers
    def _fold_case(self) -> None:
        """A family or format named in another case ("MXFP4", "GGUF") is that one: the registered name is taken
        when only the lower-case spelling is registered (a registered name is never changed)."""
        from .quantizers import available_quantizers

        families = ["auto", *available_quantizers()]
        for name, known in (("method", families), ("embedding_method", families), ("export_format", list(FORMATS))):
            value = getattr(self, name)
            if isinstance(value, str) and value not in known and value.lower() in known:
                setattr(self, name, value.lower())

    def _check_quantizers(self) -> None:
        """bits/method and embedding_bits/embedding_method: known families at bit widths they support."""
        from .quantizers import available_quantizers, get_quantizer_class

        self.bits = normalize_bits(self.bits)
        for field_name in ("method", "embedding_method"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or (value != "auto" and value not in available_quantizers()):
                raise QATConfigError(field_name, value, ", ".join(["auto", *available_quantizers()]))
        get_quantizer_class(self.resolved_method).check_bits(self.bits, field_name="bits", method_field="method")
        if self.embedding_bits is None:
            return
        self.embedding_bits = normalize_bits(self.embedding_bits, "embedding_bits")
        if self.embedding_method == "auto" and self.embedding_bits < 4:
            raise QATConfigError(
                "embedding_bits", self.embedding_bits,
                "4, 5, 6 or 8 with embedding_method='auto' (the paper quantizes embeddings at no fewer "
                "than 4 bits; name embedding_method explicitly to go lower)",
            )
        get_quantizer_class(self.resolved_embedding_method).check_bits(
            self.embedding_bits, field_name="embedding_bits", method_field="embedding_method"
        )

    def _families(self) -> dict[str, type]:
        """The quantizer family of each field that names one: {"method": cls, "embedding_method": cls}."""
        from .quantizers import get_quantizer_class

        families = {"method": get_quantizer_class(self.resolved_method)}
        if self.embedding_bits is not None:
            families["embedding_method"] = get_quantizer_class(self.resolved_embedding_method)
        return families

    def _default_group_size(self) -> int:
        """group_size=None: the block of the (first) block-scaled family, else 32."""
        return next((cls.block_size for cls in self._families().values() if cls.block_size is not None), 32)

    def _check_block_formats(self) -> None:
        """A block-scaled family takes its own block as group_size, and scale_dtype does not apply to it."""
        families = self._families()
        for field_name, cls in families.items():
            cls.check_group_size(self.group_size, method_field=field_name)
        embedding = families.get("embedding_method")
        if embedding is not None and embedding.block_size is not None and families["method"].block_size is None:
            # one group_size serves both: the embedding's block would silently become the weights' group size
            raise QATConfigError("embedding_method", self.embedding_method,
                                 f"an integer family (the weights' {families['method'].name!r} is one), or a "
                                 "block-scaled method for the weights too",
                                 detail="group_size serves the weights and the embeddings alike, and a block-scaled "
                                        "format takes only its own block")
        if self.scale_dtype not in ("float16", "auto") and all(cls.scale_dtype is not None for cls in families.values()):
            names = " and ".join(sorted({repr(cls.name) for cls in families.values()}))
            raise QATConfigError("scale_dtype", self.scale_dtype, f"'float16' (the default) with {names}",
                                 detail="A block-scaled format rounds its scales to its own format (MXFP4: E8M0, "
                                 "NVFP4: E4M3, the ggml k-quants: integers under an fp16 scale); scale_dtype "
                                 "applies to the integer families")
        ggml = [cls.name for cls in families.values() if cls.export_formats == ("gguf",)]
        if self.activation_bits is not None and ggml:  # (a gguf_mix's base family is one of them)
            raise QATConfigError("activation_bits", self.activation_bits, f"None with {ggml[0]!r}",
                                 detail="llama.cpp's blocks are exported to GGUF only, and llama.cpp does not "
                                 "fake-quantize activations as int8 per token")

    def _adopt_gguf_mix(self) -> None:
        """``QATConfig(gguf_mix=t)`` alone: method "auto" becomes the file type's base family, at its bits (bits
        left at the default, or already those; other bits are refused by :meth:`_check_gguf_mix`)."""
        if isinstance(self.gguf_mix, str):
            self.gguf_mix = self.gguf_mix.lower()  # llama.cpp's names in any case, as the presets
        if self.method == "auto" and isinstance(self.gguf_mix, str) and self.gguf_mix in FILE_TYPES:
            method, bits, group_size = _file_type_family(self.gguf_mix)
            if normalize_bits(self.bits) in (QATConfig.bits, bits):
                self.method, self.bits = method, bits
                self.group_size = group_size if self.group_size is None else self.group_size

    def _check_export_format(self) -> None:
        """``export_format``: a registered format; it sets the default scale_dtype (see the field's docs)."""
        if self.export_format is not None:
            if not isinstance(self.export_format, str) or self.export_format not in FORMATS:
                raise QATConfigError("export_format", self.export_format, "None, " + ", ".join(FORMATS),
                                     detail=nearest(str(self.export_format), FORMATS))
        if self.scale_dtype is None:
            integer_scales = any(cls.scale_dtype is None for cls in self._families().values())
            self.scale_dtype = "auto" if self.export_format == "compressed-tensors" and integer_scales else "float16"

    def resolved_scale_dtype(self, weight_dtype) -> str:
        """The scale dtype of a weight of ``weight_dtype`` ("auto": bfloat16 for a bfloat16 weight, else float16)."""
        import torch

        if self.scale_dtype != "auto":
            return self.scale_dtype
        return "bfloat16" if weight_dtype == torch.bfloat16 else "float16"

    def _check_gguf_mix(self) -> None:
        """``gguf_mix``: a known mix, with its base family as bits / method and no embedding_bits."""
        if self.gguf_mix is None:
            return
        if isinstance(self.gguf_mix, str) and self.gguf_mix.lower() in UNTRAINABLE:
            raise QATConfigError("gguf_mix", self.gguf_mix, "None, " + ", ".join(FILE_TYPES),
                                 detail=f"hf_qat cannot train llama.cpp's {self.gguf_mix.upper()} file: "
                                        f"{UNTRAINABLE[self.gguf_mix.lower()]}")
        if not isinstance(self.gguf_mix, str) or self.gguf_mix not in FILE_TYPES:
            raise QATConfigError("gguf_mix", self.gguf_mix, "None, " + ", ".join(FILE_TYPES))
        method, bits, group_size = _file_type_family(self.gguf_mix)
        if (self.resolved_method, self.bits) != (method, bits):
            field = "bits" if self.method == "auto" or self.resolved_method == method else "method"
            raise QATConfigError(field, getattr(self, field), f"{method!r} with bits={bits} for gguf_mix={self.gguf_mix!r} "
                                 f"(its base type; QATConfig(gguf_mix={self.gguf_mix!r}) sets both)")
        if self.group_size != group_size:
            raise QATConfigError("group_size", self.group_size, f"{group_size} for gguf_mix={self.gguf_mix!r} (its base "
                                 f"type's block; QATConfig(gguf_mix={self.gguf_mix!r}) sets it)")
        if self.export_format not in (None, "gguf"):
            raise QATConfigError("export_format", self.export_format, f"None or 'gguf' for gguf_mix={self.gguf_mix!r} "
                                 "(a llama.cpp file type is a GGUF file)")
        if self.scale_dtype != "float16":
            raise QATConfigError("scale_dtype", self.scale_dtype, f"'float16' for gguf_mix={self.gguf_mix!r} (llama.cpp's "
                                 "block scales are fp16)")
        if self.embedding_bits is not None:
            raise QATConfigError("embedding_bits", self.embedding_bits, f"None with gguf_mix={self.gguf_mix!r} (the mix "
                                 "gives the embedding and the LM head their llama.cpp types)")

    def _learnable_families(self) -> bool:
        return all(cls.learnable for cls in self._families().values())

    def _check_distill(self) -> None:
        """``distill``: a dict of :class:`DistillConfig` keys; 'switch' needs an FP phase."""
        config = DistillConfig.from_value(self.distill)
        if config is None:
            return
        if config.teacher == "switch" and (self.start == 0 or self.start == 1.0):
            raise QATConfigError("distill.teacher", "switch", "'initial', a model id or path, or an nn.Module when "
                                 f"start={self.start!r} (QAT from step 0: there is no FP phase to snapshot)")
        self.distill = {**config.to_dict(), "teacher": config.teacher}

    def scale_peak_lr(self, base_lr: float) -> float:
        """The scales' peak learning rate for a run whose peak base LR is ``base_lr``."""
        if self.scale_lr_multiplier is not None:
            return base_lr * self.scale_lr_multiplier
        return DEFAULT_SCALE_LR if self.scale_lr is None else self.scale_lr

    @property
    def distill_config(self) -> DistillConfig | None:
        """The validated :class:`DistillConfig`, or None."""
        return DistillConfig.from_value(self.distill)

    @staticmethod
    def _check_pretrained_tokens(value: Any) -> float | int | None:
        if isinstance(value, str):  # "2T", "2e12" (YAML reads 2.0e12 as text)
            from .counts import parse_count

            try:
                value = parse_count(value)
            except ValueError:
                raise QATConfigError("pretrained_tokens", value, "None or a number >= 0 (e.g. 2e12 or '2T')") from None
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (math.isfinite(value) and value >= 0)):
            raise QATConfigError("pretrained_tokens", value, "None or a finite number >= 0")
        return value

    def _check_numbers(self) -> None:
        """scale_lr / scale_lr_multiplier, the schedule's ratios, sequence_length."""
        for name in ("scale_lr_multiplier", "scale_lr"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0)):
                raise QATConfigError(name, value, "None or a finite number > 0")
        if self.scale_lr is not None and self.scale_lr_multiplier is not None:
            raise QATConfigError("scale_lr", self.scale_lr, "None when scale_lr_multiplier is set (the scales' LR is "
                                 "either absolute, scale_lr, or relative to the base LR, scale_lr_multiplier)")
        for name in ("min_lr_ratio", "fp_cooldown_fraction", "qat_warmup_fraction"):
            value = getattr(self, name)
            top_included = name == "min_lr_ratio"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0.0 <= value < 1.0 or (top_included and value == 1.0)
            ):
                raise QATConfigError(name, value, "a number in [0, 1]" if top_included else "a number in [0, 1)")
        if self.sequence_length is not None and (
            isinstance(self.sequence_length, bool) or not isinstance(self.sequence_length, int) or self.sequence_length < 1
        ):
            raise QATConfigError("sequence_length", self.sequence_length, "None or an int >= 1")

    @staticmethod
    def _check_group_size(value: Any) -> GroupSize:
        allowed = "a power of two between 2 and 65536, 'channel' or 'tensor'"
        if isinstance(value, str):
            if value in ALLOWED_GROUP_STRINGS:
                return value
            if value.isascii() and value.isdigit():
                value = int(value)
            else:
                raise QATConfigError("group_size", value, allowed)
        if isinstance(value, bool) or not isinstance(value, int):
            raise QATConfigError("group_size", value, allowed)
        if value < 2 or value > MAX_GROUP_SIZE or value & (value - 1):
            raise QATConfigError("group_size", value, allowed)
        return value

    @staticmethod
    def _check_start(value: Any) -> Start:
        allowed = "'auto', an int step >= 0, or a float QAT fraction in (0, 1]"
        if isinstance(value, str):
            if value == "auto":
                return value
            raise QATConfigError("start", value, allowed)
        if isinstance(value, bool):
            raise QATConfigError("start", value, allowed)
        if isinstance(value, int):
            if value < 0:
                raise QATConfigError("start", value, allowed)
            return value
        if isinstance(value, float):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise QATConfigError("start", value, allowed)
            if value == 0.0:
                raise QATConfigError("start", value, allowed, detail="a QAT fraction of 0.0 means no QAT: train "
                                     "without QATCallback, or use hf_qat.ptq for the round-to-nearest baseline")
            return value
        raise QATConfigError("start", value, allowed)

    # ------------------------------------------------------------------ derived values
    @property
    def resolved_method(self) -> str:
        """The quantizer family the weights use ("auto" resolved by bit width)."""
        return auto_method(self.bits) if self.method == "auto" else self.method

    @property
    def resolved_embedding_method(self) -> str:
        return "lsq" if self.embedding_method == "auto" else self.embedding_method

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.distill is not None:
            data["distill"] = self.distill_config.to_dict()  # an nn.Module teacher is written as "nn.Module"
        return data

    def differences(self, other: "QATConfig") -> dict[str, tuple[Any, Any]]:
        """``{field: (this config's value, other's)}`` for every field whose :meth:`to_dict` value differs, in
        field order (empty: the same config)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {name: (mine[name], theirs.get(name)) for name in mine if mine[name] != theirs.get(name)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QATConfig":
        if isinstance(data, QATConfig):
            return data
        if not isinstance(data, dict):
            raise QATConfigError("config", data, "a dict of QATConfig fields")
        if data.get("extra") == {}:  # hf_qat 0.1.0 wrote an always-empty "extra" field
            data = {k: v for k, v in data.items() if k != "extra"}
        _refuse_unknown(data)
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "QATConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise QATConfigError("config", text[:80], f"valid JSON ({err})") from None
        return cls.from_dict(data)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``qat_config.json`` into ``directory``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "QATConfig":
        """Read a config from a directory holding ``qat_config.json`` or from the JSON file itself."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
        with open(path, encoding="utf-8") as fh:
            return cls.from_json_string(fh.read())

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "QATConfig":
        """A config from :data:`PRESETS` with ``overrides`` applied."""
        key = name.lower() if isinstance(name, str) else name  # "Q4_K_M" as llama.cpp writes it
        if key not in PRESETS:
            raise QATConfigError("preset", name, ", ".join(sorted(PRESETS)),
                                 detail=nearest(str(name).lower(), PRESETS))
        return cls(**{**PRESETS[key], **overrides})

    def __getattr__(self, name: str) -> Any:
        """Only for attributes a QATConfig lacks: a Trainer event (``on_init_end``, ...) asked of a config passed
        as a callback is the common slip, answered with the fix."""
        if name.startswith("on_"):  # an AttributeError still (hasattr stays a question)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}: a QATConfig was passed to "
                                 "the Trainer as a callback; pass callbacks=[hf_qat.QATCallback(config)], the callback "
                                 "that carries it")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def replace(self, **changes: Any) -> "QATConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def _file_type_family(file_type: str) -> tuple[str, float, int]:
    """``(method, bits, group_size)`` of the family that trains the base type of llama.cpp's ``file_type``."""
    from .quantizers import family_of_ggml_type

    return family_of_ggml_type(DEFAULT_TYPE[file_type])


def nearest(name: str, choices) -> str:
    """'did you mean ...?' for the choice closest to ``name`` (difflib), or "" when none is close."""
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {match[0]!r}?" if match else ""


def _refuse_unknown(fields: dict[Any, Any]) -> None:
    """A key that is no QATConfig field is a QATConfigError naming the closest field (``group_sise``)."""
    names = [f.name for f in dataclasses.fields(QATConfig)]
    unknown = sorted((k for k in fields if k not in names), key=str)
    if unknown:
        raise QATConfigError(str(unknown[0]), fields[unknown[0]], "a QATConfig field: " + ", ".join(sorted(names)),
                             detail=nearest(str(unknown[0]), names))


def _refuse_unknown_fields(init):
    """QATConfig's generated __init__, refusing an unknown keyword (``QATConfig(group_sise=32)``) with
    :func:`_refuse_unknown` instead of a bare TypeError."""

    @functools.wraps(init)
    def checked(self, *args: Any, **kwargs: Any) -> None:
        _refuse_unknown(kwargs)
        init(self, *args, **kwargs)

    return checked


QATConfig.__init__ = _refuse_unknown_fields(QATConfig.__init__)


def auto_method(bits: float | int) -> str:
    """method="auto": binary for 1 bit, seq for ternary and 2 bits, lsq for 3..8 bits."""
    if bits == 1:
        return "binary"
    if bits in (TERNARY_BITS, 2):
        return "seq"
    return "lsq"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


PRESETS: dict[str, dict[str, Any]] = {
    # 4-bit weights, groups of 32, fp16 scales: GGUF Q4_0 and compressed-tensors pack-quantized.
    "w4g32": {"bits": 4, "group_size": 32, "scale_dtype": "float16"},
    # 4-bit weights per output channel: compressed-tensors channel strategy.
    "w4-channel": {"bits": 4, "group_size": "channel"},
    # int8 per-token activations + 4-bit weights in groups of 32: the common mobile target.
    "a8w4": {"bits": 4, "group_size": 32, "activation_bits": 8},
    # 8-bit weights, groups of 32, fp16 scales: GGUF Q8_0.
    "w8g32": {"bits": 8, "group_size": 32, "scale_dtype": "float16"},
    # 2-bit SEQ weights, groups of 32: compressed-tensors on the 4-bit grid, or the native format.
    "w2g32": {"bits": 2, "group_size": 32},
    # ternary per tensor with int8 activations: transformers BitNet, exact.
    "ternary-bitnet": {"bits": TERNARY_BITS, "group_size": "tensor", "activation_bits": 8, "scale_dtype": "float32"},
    # ternary in groups of 256 with fp16 scales: GGUF TQ2_0 / TQ1_0.
    "ternary-g256": {"bits": TERNARY_BITS, "group_size": 256, "scale_dtype": "float16"},
    # 1-bit weights per output channel (native format).
    "binary": {"bits": 1, "group_size": "channel"},
    # FP4 E2M1 in blocks of 32 with E8M0 scales: compressed-tensors mxfp4-pack-quantized, GGUF MXFP4.
    "mxfp4": {"bits": 4, "method": "mxfp4"},
    # FP4 E2M1 in blocks of 16 with E4M3 scales and a per-tensor scale: compressed-tensors
    # nvfp4-pack-quantized, GGUF NVFP4.
    "nvfp4": {"bits": 4, "method": "nvfp4"},
    # llama.cpp's file types (q4_0 ... q4_k_m ... mxfp4_moe): every tensor on the type `llama-quantize <ftype>`
    # gives it (GGUF, exact); the base family comes from the file type (QATConfig(gguf_mix=...)).
    **{file_type: {"gguf_mix": file_type} for file_type in FILE_TYPES},
}
