"""hf_qat.kernels: Triton kernels for QAT and the one dispatch point that chooses them.

Installed from the repository's top-level ``kernels/`` folder as the subpackage ``hf_qat.kernels``.
Triton is optional: without it (or for CPU tensors) the PyTorch reference runs.

When Python runs with the repository root on ``sys.path`` (``python -m pytest`` or ``python -c``
from the checkout), this folder is also visible as a top-level package named ``kernels``, the name
of the Hugging Face ``kernels`` package, and transformers probes it by importing it. Under that name
it therefore loads nothing: it is only ever meant to be ``hf_qat.kernels``.
"""

if __name__ == "hf_qat.kernels":
    from .dispatch import (
        BACKENDS,
        ENV_VAR,
        activation_fake_quant,
        dequantize_packed,
        requested_backend,
        select_engine,
        triton_available,
        weight_fake_quant,
    )

    __all__ = [
        "BACKENDS",
        "ENV_VAR",
        "activation_fake_quant",
        "dequantize_packed",
        "requested_backend",
        "select_engine",
        "triton_available",
        "weight_fake_quant",
    ]
