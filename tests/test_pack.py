"""Bit packing: exact round trip over every bit-width and odd shapes, plus the layout itself."""

import pytest
import torch

from qtool.quant.pack import pack, packed_words, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K", [1, 7, 31, 32, 33, 95, 96, 576, 1000])
def test_round_trip_exact(bits, K):
    gen = torch.Generator().manual_seed(bits * 1000 + K)
    codes = torch.randint(0, 2**bits, (5, K), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, packed_words(K, bits))
    assert torch.equal(unpack(packed, bits, K), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes_round_trip(bits):
    # All-ones codes set bit 31 of words: the sign bit of int32 must survive.
    codes = torch.full((3, 64), 2**bits - 1, dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, 64), codes)
    assert (pack(codes, bits) == -1).all()


def test_4bit_layout_lowest_code_in_lowest_bits():
    codes = torch.arange(8, dtype=torch.uint8).repeat(4).reshape(1, 32)
    word = pack(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 0x76543210


def test_3bit_dense_stream_straddles_words():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111  # stream bits 30, 31, 32: two bits in word 0, one in word 1
    p = pack(codes, 3)
    assert p.shape == (1, 3)  # 32 codes fill exactly 3 words
    assert (p[0, 0].item() & 0xFFFFFFFF) == 0xC0000000
    assert p[0, 1].item() == 1
    assert p[0, 2].item() == 0


def test_unpack_rejects_wrong_width():
    with pytest.raises(ValueError):
        unpack(torch.zeros(2, 5, dtype=torch.int32), 4, 64)
