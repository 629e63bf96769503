"""SweepConfig: the grid of a sweep, read from YAML and validated before anything trains.

The keys (the contract of ``hf-qat sweep``; keys may be added, never renamed)::

    sizes:            name -> config overrides (hidden_size, num_hidden_layers, ...); ``architecture``:
                      "llama" (default), "qwen3", or "qwen3_moe" (a mixture of experts: num_experts,
                      num_experts_per_tok, moe_intermediate_size; rows then record active_params)
    data:             "demo" (the Python standard library, offline), or a mapping with one of
                      dataset (a datasets id, + config_name, split), text_files, jsonl_files;
                      text_column; tokenizer (an id or path; default: a byte-level BPE of
                      vocab_size tokens trained on the data)
    vocab_size:       the model's vocabulary (and the trained tokenizer's)
    sequence_length:  tokens per training example
    batch_size:       examples per optimizer step
    learning_rate:    peak (stable) learning rate
    warmup_steps:     linear warmup, shared by every run
    budgets:          total tokens per run
    bits:             weight bit widths (1, 1.58/"ternary", 2, 3, 4, 5, 6, 8)
    method:           the quantizer family, as QATConfig's ``method`` (optional; "auto" by default:
                      binary for 1 bit, seq for ternary/2, lsq for 3..8; or any registered family); an
                      ``extra`` grid may name another, e.g. an FP4 family beside lsq at 4 bits
    fractions:        QAT fractions in [0, 1]; 0 = the FP row and one PTQ row per bit width (optional:
                      DEFAULT_FRACTIONS, whose 0.03, 0.05 and 0.15 bracket an optimum near 0.1)
    schedules:        fused | classic
    group_size:       scales per group of input columns (int, "channel", "tensor")
    eval_tokens:      held-out tokens every row is evaluated on
    seed:             model initialisation and data order

Added keys: ``weight_decay`` (0.1), ``max_grad_norm`` (1.0), ``decay_shape`` ("linear"),
``min_lr_ratio`` (0.0), ``fp_cooldown_fraction`` (0.2, the FP row's and classic runs' cooldown),
``qat_warmup_fraction`` (0.05, classic runs), ``scale_lr`` / ``scale_lr_multiplier`` (the scales'
learning rate, as QATConfig's: absolute, 0.02 by default, or the base LR times a multiplier),
``tie_word_embeddings`` (true), ``method`` ("auto"), and ``extra``: a list of partial grids, each
overriding any of ``sizes`` (a list of size names), budgets, bits, method, fractions, schedules, seed
(e.g. classic runs at one size, a second seed at one point to measure eval noise, or the same cell
with another quantizer family).

A method that ``auto`` would choose for a bit width anyway (lsq at 4 bits) is that bit width's auto
method: the same runs, rows and keys as a sweep without the key. Any other method is part of the run
key (``.../4-<method>/0.5/fused``) and of each row (``method``), so rows of two methods never collide,
and a folder written before the key existed reads as it did.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from ..bits import normalize_bits
from ..config import QATConfig
from ..errors import QATConfigError

SCHEDULES = ("fused", "classic")
DATA_KEYS = ("dataset", "config_name", "split", "text_files", "jsonl_files", "text_column", "tokenizer")
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "rms_norm_eps", "rope_theta", "architecture")
# A size's "architecture": a transformers model type, with the keys of its own it takes.
ARCHITECTURES = {"llama": (), "qwen3": (), "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size")}
NUMBER_KEYS = ("learning_rate", "weight_decay", "max_grad_norm", "min_lr_ratio", "fp_cooldown_fraction",
               "qat_warmup_fraction", "scale_lr_multiplier", "scale_lr")
# Keys passed on to QATConfig as they are, so validated by it.
QAT_KEYS = ("group_size", "decay_shape", "min_lr_ratio", "fp_cooldown_fraction", "qat_warmup_fraction")
EXTRA_KEYS = ("sizes", "budgets", "bits", "method", "fractions", "schedules", "seed")
AUTO = "auto"
# Fine below 0.25, where the optimum of short runs lies: an optimum at the smallest fraction is only a bound.
DEFAULT_FRACTIONS = (0.0, 0.03, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0)


class SweepConfigError(ValueError):
    """A sweep file key is missing, unknown or out of range; the message names the key and the allowed values."""

    def __init__(self, key: str, value: Any, allowed: str, detail: str = "") -> None:
        self.key = key
        message = f"sweep key {key!r} = {value!r} is not allowed; allowed: {allowed}"
        super().__init__(message + (f". {detail}" if detail else ""))


@dataclass(frozen=True)
class Grid:
    """One rectangular block of runs (the top-level keys, or one entry of ``extra``)."""

    sizes: tuple[str, ...]
    budgets: tuple[float, ...]
    bits: tuple[float | int, ...]
    fractions: tuple[float, ...]
    schedules: tuple[str, ...]
    seed: int
    method: str = AUTO  # the quantizer family of the grid's QAT and PTQ rows (QATConfig.method)


@dataclass
class SweepConfig:
    sizes: dict[str, dict[str, Any]]
    budgets: list[float]
    bits: list[Any]
    fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS))
    data: Any = "demo"
    vocab_size: int = 512
    sequence_length: int = 128
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    schedules: list[str] = field(default_factory=lambda: ["fused"])
    group_size: Any = 32
    eval_tokens: int = 65536
    seed: int = 0
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0
    fp_cooldown_fraction: float = 0.2
    qat_warmup_fraction: float = 0.05
    scale_lr_multiplier: float | None = None
    scale_lr: float | None = None
    tie_word_embeddings: bool = True
    extra: list[dict[str, Any]] = field(default_factory=list)
    method: str = AUTO

    def __post_init__(self) -> None:
        # PyYAML reads 1.0e6 (no sign in the exponent) as a string: numbers written so are numbers.
        for key in NUMBER_KEYS:
            setattr(self, key, _yaml_number(getattr(self, key)))
        self.budgets = [_yaml_number(b) for b in self.budgets] if isinstance(self.budgets, list) else self.budgets
        self.fractions = [_yaml_number(f) for f in self.fractions] if isinstance(self.fractions, list) else self.fractions
        self._check_sizes()
        self._check_data()
        for key in ("vocab_size", "sequence_length", "batch_size", "eval_tokens"):
            _positive_int(key, getattr(self, key))
        _non_negative_int("warmup_steps", self.warmup_steps)
        _non_negative_int("seed", self.seed)
        for key in ("learning_rate", "max_grad_norm"):
            _positive_number(key, getattr(self, key))
        for key in ("scale_lr_multiplier", "scale_lr"):
            if getattr(self, key) is not None:
                _positive_number(key, getattr(self, key))
        if self.scale_lr is not None and self.scale_lr_multiplier is not None:
            raise SweepConfigError("scale_lr", self.scale_lr, "unset when scale_lr_multiplier is set (one or the other)")
        if not _is_number(self.weight_decay) or not 0.0 <= self.weight_decay <= 1.0:
            raise SweepConfigError("weight_decay", self.weight_decay, "a number in [0, 1]")
        try:  # the keys that QATConfig also takes follow its rules (a value it refuses would fail every run)
            QATConfig(bits=4, start=0, **{key: getattr(self, key) for key in QAT_KEYS})
        except QATConfigError as exc:
            raise SweepConfigError(exc.field, exc.value, exc.allowed) from None
        if not isinstance(self.extra, list) or not all(isinstance(e, dict) for e in self.extra):
            raise SweepConfigError("extra", self.extra, "a list of mappings with keys " + ", ".join(EXTRA_KEYS))
        self.grids = [self._grid({}, "")] + [self._grid(e, f"extra[{i}].") for i, e in enumerate(self.extra)]

    # ------------------------------------------------------------------ checks
    def _check_sizes(self) -> None:
        if not isinstance(self.sizes, dict) or not self.sizes:
            raise SweepConfigError("sizes", self.sizes, "a mapping of size names to LlamaConfig overrides")
        for name, overrides in self.sizes.items():
            if not isinstance(overrides, dict) or "hidden_size" not in overrides:
                raise SweepConfigError(f"sizes.{name}", overrides, "a mapping with at least hidden_size")
            architecture = overrides.get("architecture", "llama")
            if architecture not in ARCHITECTURES:
                raise SweepConfigError(f"sizes.{name}.architecture", architecture, ", ".join(ARCHITECTURES))
            allowed = SIZE_KEYS + ARCHITECTURES[architecture]
            unknown = sorted(set(overrides) - set(allowed))
            if unknown:
                raise SweepConfigError(f"sizes.{name}.{unknown[0]}", overrides[unknown[0]], ", ".join(allowed))
            missing = [key for key in ARCHITECTURES[architecture][:2] if key not in overrides]
            if missing:
                raise SweepConfigError(f"sizes.{name}.{missing[0]}", None, f"a positive int (a {architecture} size "
                                       f"names {' and '.join(ARCHITECTURES[architecture][:2])})")
            for key, value in overrides.items():
                if key not in ("rms_norm_eps", "rope_theta", "architecture"):
                    _positive_int(f"sizes.{name}.{key}", value)
            if ARCHITECTURES[architecture] and overrides["num_experts_per_tok"] > overrides["num_experts"]:
                raise SweepConfigError(f"sizes.{name}.num_experts_per_tok", overrides["num_experts_per_tok"],
                                       f"at most num_experts={overrides['num_experts']}")

    def _check_data(self) -> None:
        if self.data == "demo":
            return
        if not isinstance(self.data, dict):
            raise SweepConfigError("data", self.data, "'demo' or a mapping with dataset, text_files or jsonl_files")
        unknown = sorted(set(self.data) - set(DATA_KEYS))
        if unknown:
            raise SweepConfigError(f"data.{unknown[0]}", self.data[unknown[0]], ", ".join(DATA_KEYS))
        if sum(k in self.data for k in ("dataset", "text_files", "jsonl_files")) != 1:
            raise SweepConfigError("data", self.data, "exactly one of dataset, text_files, jsonl_files")

    def _grid(self, spec: dict[str, Any], prefix: str) -> Grid:
        unknown = sorted(set(spec) - set(EXTRA_KEYS))
        if unknown:
            raise SweepConfigError(prefix + unknown[0], spec[unknown[0]], ", ".join(EXTRA_KEYS))
        sizes = spec.get("sizes", list(self.sizes))
        for name in _as_list(prefix + "sizes", sizes):
            if name not in self.sizes:
                raise SweepConfigError(prefix + "sizes", name, "names from sizes: " + ", ".join(self.sizes))
        budgets = [_yaml_number(b) for b in _as_list(prefix + "budgets", spec.get("budgets", self.budgets))]
        tokens_per_step = self.batch_size * self.sequence_length
        for budget in budgets:
            if not _is_number(budget) or budget < tokens_per_step:
                raise SweepConfigError(prefix + "budgets", budget, f"token counts >= one step "
                                       f"(batch_size x sequence_length = {tokens_per_step})")
        bits = []
        for value in _as_list(prefix + "bits", spec.get("bits", self.bits)):
            try:
                bits.append(normalize_bits(value))
            except QATConfigError as exc:
                raise SweepConfigError(prefix + "bits", value, exc.allowed) from None
        fractions = [_yaml_number(f) for f in _as_list(prefix + "fractions", spec.get("fractions", self.fractions))]
        for value in fractions:
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise SweepConfigError(prefix + "fractions", value, "numbers in [0, 1]")
        schedules = _as_list(prefix + "schedules", spec.get("schedules", self.schedules))
        for value in schedules:
            if value not in SCHEDULES:
                raise SweepConfigError(prefix + "schedules", value, ", ".join(SCHEDULES))
        seed = spec.get("seed", self.seed)
        _non_negative_int(prefix + "seed", seed)
        method = spec.get("method", self.method)
        for value in bits:  # QATConfig's rules: a known family, at a bit width and group size it takes
            try:
                self.qat_config(value, method)
            except QATConfigError as exc:
                key = exc.field if exc.field == "group_size" else prefix + exc.field
                raise SweepConfigError(key, exc.value, exc.allowed, detail="" if exc.field == "method" else
                                       f"with bits {value} and method {method!r}") from None
        return Grid(tuple(sizes), tuple(float(b) for b in budgets), tuple(bits), tuple(float(f) for f in fractions),
                    tuple(schedules), int(seed), method)

    # ------------------------------------------------------------------ derived
    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.sequence_length

    def total_steps(self, budget: float) -> int:
        return max(1, int(round(budget / self.tokens_per_step)))

    def qat_config(self, bits: float | int, method: str = AUTO) -> QATConfig:
        """The QATConfig of every tail at ``bits`` with ``method`` (the switch is placed by the sweep, not
        the config)."""
        return QATConfig(bits=bits, method=method, group_size=self.group_size, start=0,
                         scale_lr_multiplier=self.scale_lr_multiplier, scale_lr=self.scale_lr, log_quant_error=False)

    def scale_peak_lr(self, base_lr: float) -> float:
        """The scales' peak LR (QATConfig's rule, from ``scale_lr`` / ``scale_lr_multiplier``)."""
        return QATConfig(start=0, scale_lr_multiplier=self.scale_lr_multiplier, scale_lr=self.scale_lr).scale_peak_lr(base_lr)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepConfig":
        if not isinstance(data, dict):
            raise SweepConfigError("<file>", type(data).__name__, "a YAML mapping of sweep keys")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise SweepConfigError(unknown[0], data[unknown[0]], ", ".join(names))
        missing = [k for k in ("sizes", "budgets", "bits") if k not in data]
        if missing:
            raise SweepConfigError(missing[0], None, "a value (required)")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "SweepConfig":
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise SweepConfigError("<file>", os.fspath(path), "valid YAML", detail=str(exc)) from None
        return cls.from_dict(data or {})


def _yaml_number(value: Any) -> Any:
    """``value`` as a float when it is a string that spells a number (YAML 1.1 reads 1.0e6 as text)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SweepConfigError(key, value, "an integer > 0")


def _non_negative_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SweepConfigError(key, value, "an integer >= 0")


def _positive_number(key: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise SweepConfigError(key, value, "a number > 0")


def _as_list(key: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)) or not value:
        raise SweepConfigError(key, value, "a non-empty list")
    return list(value)
