"""Packing: round trips at every width, the compressed-tensors layout, and the dequant kernel."""

from __future__ import annotations

import pytest
import torch

from hf_qat.kernels.pack import (
    dequantize_reference,
    pack_bits,
    pack_int32,
    packed_bytes_per_row,
    unpack_bits,
    unpack_int32,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("cols", [8, 13, 64, 100])
def test_round_trip_and_size(bits, cols):
    values = torch.randint(0, 1 << bits, (5, cols), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_bytes_per_row(cols, bits))
    assert packed.shape[1] == -(-cols // 8) * bits  # no waste beyond padding the row to 8 values
    assert torch.equal(unpack_bits(packed, bits, cols), values)


def test_layout_is_little_endian_with_element_zero_lowest():
    assert pack_bits(torch.tensor([[1, 2, 3, 0, 0, 0, 0, 15]]), 4).tolist() == [[0x21, 0x03, 0x00, 0xF0]]
    assert pack_bits(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1]]), 1).tolist() == [[0b10001101]]


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_words_match_compressed_tensors(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 64), generator=torch.Generator().manual_seed(0))
    ours = pack_int32(q + (1 << (bits - 1)), bits)
    theirs = ct.pack_to_int32(q.to(torch.int8), bits)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, 64), q + (1 << (bits - 1)))


def test_out_of_range_values_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([[4, 0, 0, 0, 0, 0, 0, 0]]), 2)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("bits,table", [(1, [-1.0, 1.0]), (2, [-3.0, -1.0, 1.0, 3.0]), (3, list(range(-4, 4))),
                                        (4, list(range(-8, 8))), (6, list(range(-32, 32))), (8, list(range(-128, 128)))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_dequant_matches_reference(bits, table, dtype):
    pytest.importorskip("triton")
    from hf_qat.kernels.triton_unpack import unpack_dequantize

    gen = torch.Generator().manual_seed(bits)
    rows, cols = 7, 96
    values = torch.randint(0, len(table), (rows, cols), generator=gen)
    packed = pack_bits(values, bits).to(DEVICE)
    table_t = torch.tensor(table, dtype=torch.float32, device=DEVICE)
    for step in (torch.rand(rows, 3, generator=gen), torch.rand(1, 1, generator=gen)):
        step = step.to(torch.float16).float().to(DEVICE)
        ref = dequantize_reference(packed, bits, cols, table_t, step, dtype)
        out = unpack_dequantize(packed, bits, cols, table_t, step, dtype)
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
