"""llama.cpp's own quantizer as a baseline for QAT (used by benchmarks/formats_smollm2.py; not a benchmark).

``llama_quantize(model, tokenizer, out_dir, ftype, imatrix=None)`` writes ``model`` (as it computes now) to
an F32 GGUF with hf_qat's writer (``export_float_gguf``) and runs ``llama_model_quantize`` on it at one of
llama.cpp's file types ("Q4_K_M", ...), the same as ``llama-quantize f32.gguf out.gguf Q4_K_M``.

``importance_matrix(model, blocks)`` computes what ``llama-imatrix`` computes, for llama.cpp's quantizer to
weigh each input column's error by: for every Linear (by its GGUF tensor name), the mean over the
calibration tokens of each input's square (``sum x_j^2 / tokens``). llama-cpp-python 0.3.36's C API takes
it as a null-terminated array of ``llama_model_imatrix_data {name, data, size}``.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch



@torch.no_grad()
def importance_matrix(model, blocks: torch.Tensor, batch_size: int = 4) -> dict[str, np.ndarray]:
    """{GGUF tensor name: fp32 [in_features]} mean squared input of every Linear over ``blocks [n, seq]``."""
    import gguf

    from hf_qat.llamacpp.architectures import architecture

    cfg = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, architecture(cfg).gguf_arch), cfg.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
            if gguf_name is None:
                continue

            def hook(_, args, gguf_name=gguf_name):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[gguf_name] = sums.get(gguf_name, 0) + x.pow(2).sum(0)
                counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        model.eval()
        for start in range(0, len(blocks), batch_size):
            model(blocks[start:start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    out = {name: (total / counts[name]).numpy().astype(np.float32) for name, total in sums.items()}
    if getattr(cfg, "tie_word_embeddings", False) and "output.weight" in out:  # llama.cpp quantizes token_embd
        out["token_embd.weight"] = out.pop("output.weight")
    return out


def llama_quantize(model, tokenizer, out_dir: str, ftype: str, imatrix: dict[str, np.ndarray] | None = None) -> str:
    """The GGUF llama.cpp's quantizer makes of ``model`` at ``ftype`` (with ``imatrix`` if given); its path."""
    import llama_cpp

    from hf_qat.export import export_float_gguf

    f32 = export_float_gguf(model, os.path.join(out_dir, "f32"), tokenizer)
    params = llama_cpp.llama_model_quantize_default_params()
    constant = f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}"  # llama.cpp's name of the file type: Q4_K_M, IQ4_XS, ...
    if not hasattr(llama_cpp, constant):
        raise ValueError(f"ftype={ftype!r}: llama-cpp-python has no {constant}")
    params.ftype = getattr(llama_cpp, constant)
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries  # the last entry stays zeroed: name NULL ends the list
        keep.append(entries)
    out = os.path.join(out_dir, f"model-{ftype}{'-imatrix' if imatrix else ''}.gguf")
    if llama_cpp.llama_model_quantize(f32.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}")
    os.remove(f32)
    return out
