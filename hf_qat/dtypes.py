"""The one map from dtype names (as configs and checkpoints spell them) to torch dtypes."""

from __future__ import annotations

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16`` (a ValueError names the allowed names)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not allowed; allowed: {', '.join(DTYPES)}") from None
