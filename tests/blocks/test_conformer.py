"""Conformer blocks on the shared attention: padding independence, gradients, positions."""

from __future__ import annotations

import math

import pytest
import torch

from mmgen.blocks import ConformerStack, ConvModule, sinusoidal_positions


def test_an_utterance_encodes_the_same_alone_and_in_a_padded_batch() -> None:
    torch.manual_seed(0)
    stack = ConformerStack(2, 16, 2, kernel_size=5).eval()
    x = torch.randn(3, 12, 16)
    lengths = torch.tensor([12, 7, 3])
    mask = torch.arange(12)[None] < lengths[:, None]
    x = x * mask[..., None]
    together = stack(x, key_padding_mask=mask)
    for i, n in enumerate(lengths.tolist()):
        alone = stack(x[i:i + 1, :n], key_padding_mask=torch.ones(1, n, dtype=torch.bool))
        torch.testing.assert_close(together[i, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_padding_does_not_leak_through_the_depthwise_convolution() -> None:
    torch.manual_seed(0)
    conv = ConvModule(8, kernel_size=7)
    x = torch.randn(1, 10, 8)
    mask = torch.arange(10)[None] < 6
    a = conv(x, mask)
    y = x.clone()
    y[:, 6:] = 100.0  # garbage in the padding
    b = conv(y, mask)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    with pytest.raises(ValueError, match="odd"):
        ConvModule(8, kernel_size=4)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    stack = ConformerStack(2, 16, 4, kernel_size=3)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    stack(torch.randn(2, 9, 16), key_padding_mask=mask).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters())


def test_sinusoidal_positions_formula() -> None:
    table = sinusoidal_positions(5, 8, offset=3)
    pos, i = 4, 2  # row 1 is position 4; features 4 and 5 use frequency 10000^(-4/8)
    assert table.shape == (5, 8)
    assert math.isclose(float(table[1, 2 * i]), math.sin(pos / 10000 ** (2 * i / 8)), rel_tol=1e-5)
    assert math.isclose(float(table[1, 2 * i + 1]), math.cos(pos / 10000 ** (2 * i / 8)), rel_tol=1e-5)
