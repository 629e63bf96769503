"""The q1_0 family (llama.cpp's 1-bit Q1_0 blocks): its forward is what llama.cpp's own dequantizer
(``dequantize_row_q1_0`` in the ggml library of the installed llama.cpp binding, tests/llama_runtime.py) makes of the packed blocks, its first
scale is llama.cpp's reference quantizer's, its bits per weight are the block's, and a GGUF of a model
trained on it runs in llama.cpp (``llama-Q1_0`` in tests/export/test_llama_cpp.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_qat import QATConfig
from hf_qat.errors import QATConfigError
from hf_qat.quantizers import ScaleLayout, get_quantizer
from hf_qat.quantizers.reference import WeightQuantSpec, fake_quantize_weight
from llama_runtime import ggml_library


def ggml_base():
    return ggml_library("dequantize_row_q1_0", "quantize_row_q1_0_ref")


def spec_of(quantizer) -> WeightQuantSpec:
    return WeightQuantSpec(quantizer.grid(), quantizer.block_size, quantizer.scale_dtype, 1.0)


def test_forward_is_what_llama_cpp_dequantizes_from_the_packed_blocks():
    torch.manual_seed(0)
    quantizer = get_quantizer("q1_0", 1)
    w = torch.randn(5, 512) * 0.02
    w[0, :3] = 0.0  # sign(0) is +1: a code, not a gap
    first = quantizer.init_scale(ScaleLayout(128).scale_view(w))
    scale = first * torch.exp(torch.randn(first.shape) * 0.3)  # moved as training moves it
    spec = spec_of(quantizer)
    fq = fake_quantize_weight(w, scale, spec)
    codes, step, block_scales = quantizer.encode(w, scale, spec)
    raw = quantizer.pack_gguf(codes, step, block_scales)
    assert raw.shape == (5, 512 // 128 * 18) and raw.dtype == np.uint8
    lib, back = ggml_base(), np.zeros(w.numel(), dtype=np.float32)
    flat = np.ascontiguousarray(raw.reshape(-1))
    lib.dequantize_row_q1_0(flat.ctypes.data, back.ctypes.data, w.numel())
    assert np.array_equal(back.reshape(w.shape), fq.numpy())
    assert set(codes.unique().tolist()) == {-1, 1} and bool((codes[0, :3] == 1).all())


def test_first_scale_is_llama_cpps_reference_d():
    """llama.cpp's ``quantize_row_q1_0_ref`` stores ``d = fp16(mean |w|)`` per block of 128, restated here by
    the library itself: its blocks dequantize to the q1_0 forward at the family's first scale."""
    torch.manual_seed(1)
    quantizer = get_quantizer("q1_0", 1)
    w = torch.randn(2, 256) * 0.05
    lib = ggml_base()
    x, blocks, back = np.ascontiguousarray(w.numpy().reshape(-1)), np.zeros(4 * 18, np.uint8), np.zeros(512, np.float32)
    lib.quantize_row_q1_0_ref(x.ctypes.data, blocks.ctypes.data, 512)
    lib.dequantize_row_q1_0(blocks.ctypes.data, back.ctypes.data, 512)
    first = quantizer.init_scale(ScaleLayout(128).scale_view(w))
    assert np.array_equal(back.reshape(2, 256), fake_quantize_weight(w, first, spec_of(quantizer)).numpy())


def test_block_and_bits_are_the_formats():
    quantizer = get_quantizer("q1_0", 1)
    assert quantizer.storage_bits() == 18 * 8 / 128
    assert QATConfig(method="q1_0", bits=1).group_size == 128
    with pytest.raises(QATConfigError, match="group_size"):
        QATConfig(method="q1_0", bits=1, group_size=32)
    with pytest.raises(QATConfigError, match="bits"):
        QATConfig(method="q1_0", bits=2)
