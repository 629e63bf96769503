"""The iq4_xs family (llama.cpp's IQ4_XS): its forward is what ggml's own ``dequantize_row_iq4_xs`` (the
installed llama.cpp binding's ggml library) makes of the packed blocks, the block layout is restated here
field by field, ``QATConfig(bits=4, method="iq4_xs")`` trains a model whose GGUF gguf-py reads back to the
baked weights, and a weight narrower than a super-block is refused with the file type that trains it.
(llama.cpp runs such a model: ``llama-IQ4_XS`` in tests/export/test_llama_cpp.py.)"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import hf_qat
from hf_qat import QATConfig
from hf_qat.errors import QATConfigError, QATModelError
from hf_qat.model.convert import quantized_weights
from hf_qat.quantizers import ScaleLayout, get_quantizer
from hf_qat.quantizers.iq4_xs import IQ4XSQuantizer
from hf_qat.quantizers.kquants import IQ4_NL_VALUES, block_scales
from hf_qat.quantizers.reference import WeightQuantSpec
from helpers import byte_level_bpe, tiny_causal_lm
from llama_runtime import ggml_library


def encoded(seed: int = 0, rows: int = 4, cols: int = 512):
    """A matrix at a learned-looking scale: ``(weights, fake-quantized, codes, block scales, raw blocks)``."""
    torch.manual_seed(seed)
    quantizer = get_quantizer("iq4_xs", 4)
    w = torch.randn(rows, cols) * 0.03
    first = quantizer.init_scale(ScaleLayout(32).scale_view(w))
    scale = first * torch.exp(torch.randn(first.shape) * 0.3)
    spec = WeightQuantSpec(quantizer.grid(), 32, torch.float16, 1.0)
    codes, step, scales = quantizer.encode(w, scale, spec)
    return w, quantizer.fake_quantize(w, scale, spec), codes, scales, quantizer.pack_gguf(codes, step, scales)


def test_forward_is_what_ggml_dequantizes_from_the_packed_blocks():
    w, fq, codes, _, raw = encoded()
    assert raw.shape == (4, 2 * 136) and raw.dtype == np.uint8
    lib, back = ggml_library("dequantize_row_iq4_xs"), np.zeros(w.numel(), dtype=np.float32)
    lib.dequantize_row_iq4_xs(np.ascontiguousarray(raw.reshape(-1)).ctypes.data, back.ctypes.data, w.numel())
    assert np.array_equal(back.reshape(w.shape), fq.numpy())
    assert set(codes.unique().tolist()) <= set(IQ4_NL_VALUES)
    assert float(((fq - w) ** 2).sum() / (w ** 2).sum()) < 0.1


def test_block_layout_restated():
    """One super-block read back by hand: d, then the 6-bit scales split into scales_h / scales_l, then the
    level indices two to a byte (element i low nibble, i + 16 high) block by block."""
    _, fq, codes, scales, raw = encoded(seed=1, rows=1, cols=256)
    block = raw[0]
    d = float(np.frombuffer(block[:2].tobytes(), dtype=np.float16)[0])
    scales_h = int(block[2]) | int(block[3]) << 8
    for j in range(8):
        low = (block[4 + j // 2] >> (4 * (j % 2))) & 15
        ls = int(low) | ((scales_h >> (2 * j)) & 3) << 4
        assert ls - 32 == int(scales.sc[0, j])
        for i in range(32):
            byte = block[8 + 16 * j + i % 16]
            index = (byte >> 4) if i >= 16 else (byte & 15)
            assert IQ4_NL_VALUES[index] == int(codes[0, 32 * j + i])
            assert d * (ls - 32) * IQ4_NL_VALUES[index] == float(fq[0, 32 * j + i])


def test_bits_and_block():
    assert IQ4XSQuantizer(4).storage_bits() == 136 * 8 / 256
    assert QATConfig(bits=4, method="iq4_xs").group_size == 32
    with pytest.raises(QATConfigError, match="group_size"):
        QATConfig(bits=4, method="iq4_xs", group_size=64)
    with pytest.raises(QATConfigError, match="bits"):
        QATConfig(bits=3, method="iq4_xs")


def test_a_trained_model_exports_to_gguf_exactly(tmp_path):
    model = tiny_causal_lm("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, method="iq4_xs", start=0))
    hf_qat.activate_qat(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 320, (2, 32))
    for _ in range(3):  # the scales and weights move off their first values
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    hf_qat.export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=byte_level_bpe("gpt-2"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, weight in quantized_weights(model):
        baked = weight.weight_quantizer.quantized(weight.weight.detach()).numpy()
        if name.endswith(("q_proj", "k_proj")):  # llama.cpp's row order for rotary pairs
            baked = baked.reshape(4, 2, -1, baked.shape[1]).swapaxes(1, 2).reshape(baked.shape)
        tensor = tensors[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        assert tensor.tensor_type.name == "IQ4_XS", name
        back = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(baked.shape)
        assert np.array_equal(back, baked), name


def test_a_width_not_a_multiple_of_256_is_refused_with_the_file_type():
    model = tiny_causal_lm("llama", hidden_size=64)
    with pytest.raises(QATModelError, match=r"256.*from_preset\('iq4_xs'\).*IQ4_NL"):
        hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, method="iq4_xs"))
