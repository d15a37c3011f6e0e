"""The C++ decoder step (mmgen.kernels.native_decoder, ``csrc/decoder_step.cpp``) against the PyTorch step it
replaces on the CPU, at widths that take every path of its loops: heads of 36 (two vectors of 16 and a tail), memories
of 70 frames (a block of 64 and a tail), feed-forward and projection widths that are not multiples of 64, a few rows
(one thread) and many (split between threads), padded and empty memories, each activation, with and without biases,
and a stack without cross-attention; beams reordered through the lineage table. Also the choice of the step by
default and its errors."""

from __future__ import annotations

import pytest
import torch

from mmgen.blocks.transformer import TransformerStack
from mmgen.kernels.native import native_usable
from mmgen.kernels.native_decoder import NativeDecoder, native_decoder_unsupported

D, H, LAYERS, L, T = 72, 2, 2, 12, 70
ATOL = 2e-5


def _stack(cross: bool = True, bias: bool = True, activation: str = "gelu") -> TransformerStack:
    torch.manual_seed(0)
    stack = TransformerStack(LAYERS, D, H, d_ff=3 * D + 8, causal=True, cross_attention=cross, bias=bias).eval()
    with torch.no_grad():
        for p in stack.parameters():  # biases and norms away from their initial 0 and 1
            p.add_(torch.randn_like(p) * 0.1)
    if activation != "gelu":
        for block in stack.blocks:
            block.ff.act = {"silu": torch.nn.SiLU, "relu": torch.nn.ReLU}[activation]()
    return stack


def _memory(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A memory (b, T, D): utterance 1 padded to 40 frames, utterance 2 with no real frame; the others whole."""
    memory = torch.randn(b, T, D)
    lengths = torch.full((b,), T)
    lengths[1:2] = 40
    lengths[2:3] = 0
    return memory, torch.arange(T)[None, :] < lengths[:, None]


def test_the_kernels_build_here() -> None:
    assert native_usable(), "the C++ kernels must build on this machine (a C++ compiler and ninja)"


@pytest.mark.parametrize(("b", "k"), [(1, 4), (3, 2), (8, 4)])  # 4, 6 and 32 rows (split between threads)
@pytest.mark.parametrize("fixed", [False, True])
def test_native_step_equals_the_pytorch_step(b: int, k: int, fixed: bool) -> None:
    stack = _stack()
    memory, mask = _memory(b)
    rows = b * k
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ref = stack.step_cache(rows, L, memory=memory, memory_mask=mask, native=False)
        nat = stack.step_cache(rows, L, memory=memory, memory_mask=mask, native=True)
        assert ref.native is None and isinstance(nat.native, NativeDecoder)
        for i in range(L):
            x = torch.randn(rows, D, generator=g)
            position = torch.tensor([i])
            want = stack.step(x, position, ref, None if fixed else i + 1)
            got = stack.step(x, position, nat, None if fixed else i + 1)
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
            # Every hypothesis's keys and values, read through the lineage, are the PyTorch cache's rows.
            lineage = nat.native.lineage
            through = torch.stack([nat.kv[:, :, lineage[j], :, j] for j in range(i + 1)], dim=-2)
            torch.testing.assert_close(through, ref.kv[..., :i + 1, :], rtol=0, atol=ATOL)
            if i % 3 == 1:  # beams move within their utterance
                index = (torch.arange(rows) // k * k + torch.randint(0, k, (rows,), generator=g))
                ref.reorder(index, None if fixed else i + 1)
                nat.reorder(index, None if fixed else i + 1)


@pytest.mark.parametrize(("cross", "bias", "activation"),
                         [(False, False, "gelu"), (True, False, "silu"), (True, True, "relu")])
def test_native_step_without_memory_biases_or_gelu(cross: bool, bias: bool, activation: str) -> None:
    stack = _stack(cross, bias, activation)
    memory, mask = _memory(2) if cross else (None, None)
    kw = dict(memory=memory, memory_mask=mask)
    with torch.no_grad():
        ref = stack.step_cache(4, L, native=False, **kw)
        nat = stack.step_cache(4, L, **kw)  # the default on the CPU
        assert nat.native is not None
        for i in range(L):
            x = torch.randn(4, D)
            torch.testing.assert_close(stack.step(x, torch.tensor([i]), nat, i + 1),
                                       stack.step(x, torch.tensor([i]), ref, i + 1), rtol=0, atol=ATOL)


def test_packed_weights_follow_the_parameters() -> None:
    """The packed weights are shared between searches while the parameters are unchanged, and packed again after an
    optimiser step changes them."""
    stack = _stack(cross=False)
    with torch.no_grad():
        first = stack.step_cache(2, L, native=True).native.weights
        assert stack.step_cache(2, L, native=True).native.weights is first
        stack.blocks[0].ff.fc.weight.add_(1.0)
        again = stack.step_cache(2, L, native=True)
        assert again.native.weights is not first
        x = torch.randn(2, D)
        torch.testing.assert_close(stack.step(x, torch.tensor([0]), again, 1),
                                   stack.step(x, torch.tensor([0]), stack.step_cache(2, L, native=False), 1),
                                   rtol=0, atol=ATOL)


def test_unsupported_stacks_fall_back_and_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = _stack(cross=False)
    stack.blocks[0].ff.act = torch.nn.GELU(approximate="tanh")
    assert "activation" in native_decoder_unsupported(stack, memory=False)
    assert stack.step_cache(2, L).native is None  # the default takes the PyTorch step
    with pytest.raises(ValueError, match="cannot run this stack: activation"):
        stack.step_cache(2, L, native=True)
    assert "cross-attention" in native_decoder_unsupported(_stack(cross=True), memory=False)
    half = _stack(cross=False).to(torch.bfloat16)
    assert "float32" in native_decoder_unsupported(half, memory=False)
    monkeypatch.setenv("MMGEN_NATIVE", "0")
    assert not native_usable()
    assert _stack(cross=False).step_cache(2, L).native is None
