"""hf_qat: compute-optimal quantization-aware training for Hugging Face Transformers.

Public API::

    from hf_qat import QATConfig, QATCallback, plan_qat, export_checkpoint

hf_qat's log lines show at INFO by default; ``hf_qat.set_verbosity("warning")`` or
``HF_QAT_VERBOSITY=warning`` quiet them (:mod:`hf_qat.verbosity`).

The method follows "Compute-Optimal Quantization-Aware Training" (arXiv 2509.22935) with the ParetoQ
quantizers (arXiv 2502.02631).
"""

from .verbosity import get_verbosity, set_verbosity  # first: the hf_qat logger's handler and level
from .config import PRESETS, QATConfig
from .model.convert import (
    activate_qat,
    coverage,
    get_qat_config,
    initialize_scales,
    is_qat_active,
    prepare_model_for_qat,
    ptq,
    qat_modules,
    quantization_error,
    remove_qat,
    set_qat_active,
)
from .errors import QATConfigError, QATModelError, QATRuntimeError
from .model.importance import calibrate_importance
from .model.modules import QATEmbedding, QATLinear
from .quantizers import Quantizer, available_quantizers, register_quantizer
from .training.callback import QATCallback  # noqa: E402  (imports transformers)
from .export import check_loadable, export_checkpoint, load_exported  # noqa: E402  (registers the native format's quantizer)
from .planner import plan_qat  # noqa: E402

from .version import __version__  # noqa: E402

__all__ = [
    "PRESETS",
    "QATCallback",
    "QATConfig",
    "QATConfigError",
    "QATEmbedding",
    "QATLinear",
    "QATModelError",
    "QATRuntimeError",
    "Quantizer",
    "activate_qat",
    "available_quantizers",
    "calibrate_importance",
    "check_loadable",
    "coverage",
    "export_checkpoint",
    "load_exported",
    "plan_qat",
    "get_qat_config",
    "get_verbosity",
    "initialize_scales",
    "is_qat_active",
    "prepare_model_for_qat",
    "ptq",
    "qat_modules",
    "quantization_error",
    "register_quantizer",
    "remove_qat",
    "set_qat_active",
    "set_verbosity",
]
