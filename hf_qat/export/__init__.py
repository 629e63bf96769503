"""Low-bit checkpoints that serve without hf_qat (compressed-tensors, GGUF, BitNet) and the native format.

``export_checkpoint(model, out_dir, format=...)`` packs the integer codes the QAT model computed with
(never re-quantizes), writes a model card and a manifest, and can push the folder to the Hub.
Importing this package registers the native format's transformers quantizer.
"""

from . import bitnet, compressed_tensors, gguf, native  # noqa: F401  (registers the formats)
from .api import check_loadable, export_checkpoint, load_exported, load_qat_checkpoint
from ..errors import ExportFormatError
from .base import FORMATS, ExportInfo, choose_format
from .gguf import export_float_gguf
from .layers import QuantizedLayer, collect_layers
from .packed_modules import PackedEmbedding, PackedLinear, TiedPackedHead
from .native_quantizer import register as _register_native_quantizer

_register_native_quantizer()

__all__ = [
    "FORMATS",
    "PackedEmbedding",
    "PackedLinear",
    "TiedPackedHead",
    "ExportFormatError",
    "ExportInfo",
    "QuantizedLayer",
    "check_loadable",
    "choose_format",
    "collect_layers",
    "export_checkpoint",
    "export_float_gguf",
    "load_exported",
    "load_qat_checkpoint",
]
