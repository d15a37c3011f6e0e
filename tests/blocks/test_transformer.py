"""Tests of :class:`mmgen.blocks.transformer.TransformerStack` decoding with a :class:`DecoderCache`.

Cached decoding (one token at a time, or in chunks) must reproduce the full causal forward pass, with and without
cross-attention to a padded memory; beam-search reordering must act like reordering the prefixes; gradients must
reach every parameter. All in float32 on CPU with tiny sizes.
"""

from __future__ import annotations

import pytest
import torch

from mmgen.blocks.transformer import StepCache, TransformerStack

B, L, D, H, LAYERS = 3, 8, 16, 4, 2
T, D_MEM = 6, 12  # memory length and width
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _decoder(cross: bool) -> TransformerStack:
    kw = dict(cross_attention=True, d_memory=D_MEM) if cross else {}
    return TransformerStack(LAYERS, D, H, causal=True, **kw).eval()


def _memory(b: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """A memory (b, T, D_MEM) whose rows 1.. pad their last frames (memory_mask True on real frames)."""
    memory = torch.randn(b, T, D_MEM)
    lengths = torch.tensor([T, 3, 5][:b])
    return memory, torch.arange(T)[None, :] < lengths[:, None]


def _decode(stack, x, chunks, cache, **kw) -> torch.Tensor:
    """Feed ``x`` through ``cache`` in chunks of the given sizes; concatenate the outputs."""
    outs, start = [], 0
    for n in chunks:
        outs.append(stack(x[:, start:start + n], cache=cache, **kw))
        start += n
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# 7. Cached decoding equals the full pass.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [[1] * L, [3, 1, 4], [L]], ids=["one-by-one", "3-1-4", "all-at-once"])
def test_cached_decoding_matches_full_forward(chunks):
    stack = _decoder(cross=False)
    x = torch.randn(B, L, D)
    with torch.no_grad():
        full = stack(x)
        cache = stack.make_cache(B, L)
        cached = _decode(stack, x, chunks, cache)
    assert cache.length == L
    torch.testing.assert_close(cached, full, rtol=0, atol=ATOL)


def test_cached_decoding_with_left_padding_matches_full_forward():
    stack = _decoder(cross=False)
    x = torch.randn(B, L, D)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1, :3] = False
    kpm[2, :1] = False
    with torch.no_grad():
        full = stack(x, key_padding_mask=kpm)
        cache = stack.make_cache(B, L)
        outs, start = [], 0
        for n in [3, 1, 4]:
            outs.append(stack(x[:, start:start + n], key_padding_mask=kpm[:, :start + n], cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=ATOL)


@pytest.mark.parametrize("pass_memory", [False, True])
@pytest.mark.parametrize("chunks", [[1] * L, [3, 1, 4]], ids=["one-by-one", "3-1-4"])
def test_cached_cross_attention_decoding_matches_full_forward(chunks, pass_memory):
    stack = _decoder(cross=True)
    x = torch.randn(B, L, D)
    memory, memory_mask = _memory()
    with torch.no_grad():
        full = stack(x, memory=memory, memory_mask=memory_mask)
        cache = stack.make_cache(B, L, memory=memory, memory_mask=memory_mask)
        for c in cache.cross_caches:
            assert c is not None and c.static and c.length == T
            assert torch.equal(c.key_padding_mask, memory_mask)

        # Cross keys/values were computed by make_cache; decoding must not project the memory again.
        calls = []
        hooks = [lin.register_forward_hook(lambda *_: calls.append(1))
                 for block in stack.blocks for lin in (block.cross_attn.k_proj, block.cross_attn.v_proj)]
        try:
            kw = dict(memory=memory, memory_mask=memory_mask) if pass_memory else {}
            cached = _decode(stack, x, chunks, cache, **kw)
        finally:
            for hook in hooks:
                hook.remove()
    assert calls == []
    assert all(c.length == T for c in cache.cross_caches)  # cross caches never grow
    assert cache.length == L
    torch.testing.assert_close(cached, full, rtol=0, atol=ATOL)


def test_memory_padding_matters():
    """Sanity check for the test above: the padded frames would change the output if they were attended."""
    stack = _decoder(cross=True)
    x = torch.randn(B, L, D)
    memory, memory_mask = _memory()
    with torch.no_grad():
        masked = stack(x, memory=memory, memory_mask=memory_mask)
        unmasked = stack(x, memory=memory)
        memory2 = memory.clone()
        memory2[~memory_mask] = 100.0
        masked2 = stack(x, memory=memory2, memory_mask=memory_mask)
    assert not torch.allclose(masked[1:], unmasked[1:], atol=1e-4)
    torch.testing.assert_close(masked, masked2, rtol=0, atol=0)


def test_cross_attention_needs_memory_or_filled_cache():
    stack = _decoder(cross=True)
    with pytest.raises(ValueError, match="memory"):
        stack(torch.randn(B, 1, D))
    with pytest.raises(ValueError, match="memory"):
        stack(torch.randn(B, 1, D), cache=stack.make_cache(B, L))  # no memory given to make_cache


def test_stack_causality():
    stack = _decoder(cross=False)
    x = torch.randn(B, L, D)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(B, L - 5, D)
    with torch.no_grad():
        out1, out2 = stack(x), stack(x2)
    assert torch.equal(out1[:, :5], out2[:, :5])
    assert not torch.equal(out1[:, 5:], out2[:, 5:])


# ---------------------------------------------------------------------------------------------------------------
# 8. Beam-search reorder.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cross", [False, True])
def test_cache_reorder_matches_reordered_prefixes(cross):
    stack = _decoder(cross=cross)
    prefix_len = 5
    prefix = torch.randn(B, prefix_len, D)
    nxt = torch.randn(B, 1, D)
    index = torch.tensor([2, 0, 0])
    mem_kw, mem_kw_reordered = {}, {}
    if cross:
        memory, memory_mask = _memory()
        mem_kw = dict(memory=memory, memory_mask=memory_mask)
        mem_kw_reordered = dict(memory=memory[index], memory_mask=memory_mask[index])
    with torch.no_grad():
        cache = stack.make_cache(B, L, **mem_kw)
        _decode(stack, prefix, [2, 1, 2], cache)  # memory comes from the cross caches
        cache.reorder(index)
        if cross:  # the cross caches' padding masks must follow their rows
            assert all(torch.equal(c.key_padding_mask, mem_kw_reordered["memory_mask"]) for c in cache.cross_caches)
        step = stack(nxt, cache=cache)
        expected = stack(torch.cat([prefix[index], nxt], dim=1), **mem_kw_reordered)[:, -1:]
        # A second step after the reorder keeps working.
        nxt2 = torch.randn(B, 1, D)
        step2 = stack(nxt2, cache=cache)
        expected2 = stack(torch.cat([prefix[index], nxt, nxt2], dim=1), **mem_kw_reordered)[:, -1:]
    assert cache.length == prefix_len + 2
    torch.testing.assert_close(step, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(step2, expected2, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# 8b. Fixed-shape steps (StepCache): the full pass, one position at a time, beams sharing their utterance's memory.
# ---------------------------------------------------------------------------------------------------------------

# The fused kernel has one mode (it reads the position from the device and ignores ``length``): fixed shapes.
STEP_CASES = [(fixed, bias, transposed, False, False) for fixed in (False, True)
              for bias, transposed in ((False, False), (True, False), (True, True))]
STEP_CASES += [(True, False, False, True, False), (True, True, False, True, False)]
STEP_CASES += [(fixed, bias, False, False, True) for fixed in (False, True) for bias in (False, True)]


@pytest.mark.parametrize(("fixed", "bias", "transposed", "fused", "native"), STEP_CASES)
def test_step_matches_full_forward_with_shared_memory_and_reorder(fixed, bias, transposed, fused, native):
    """Two beams per utterance (rows 2i, 2i+1 share memory i; utterance 1's memory is padded, utterance 2's has no
    real frame at all): every step equals the full pass, before and after a reorder within each utterance. ``fused``:
    the Triton kernel (mmgen.kernels.decoder_step; in Triton's interpreter without a GPU), whose reorder moves the
    lineage table rather than the keys. ``native``: the C++ step (mmgen.kernels.native_decoder), else PyTorch."""
    stack = TransformerStack(LAYERS, D, H, causal=True, cross_attention=True, d_memory=D_MEM, bias=bias).eval()
    with torch.no_grad():
        for p in stack.parameters():  # biases and norms away from their initial 0 and 1
            p.add_(torch.randn_like(p) * 0.1)
    memory, memory_mask = _memory()
    memory_mask[2] = False
    k, rows = 2, 2 * B
    x = torch.randn(rows, L, D)
    full_memory, full_mask = memory.repeat_interleave(k, dim=0), memory_mask.repeat_interleave(k, dim=0)
    index = torch.tensor([1, 1, 2, 3, 5, 4])  # beams move within their utterance
    split = 5
    dev = "cuda" if fused and torch.cuda.is_available() else "cpu"  # the kernel compiled on a GPU
    stack, memory, memory_mask, x, full_memory, full_mask, index = (
        t.to(dev) for t in (stack, memory, memory_mask, x, full_memory, full_mask, index))
    with torch.no_grad():
        full = stack(x, memory=full_memory, memory_mask=full_mask)
        cache = stack.step_cache(rows, L, memory=memory, memory_mask=memory_mask, transposed=transposed,
                                 fused=fused, native=native)
        assert isinstance(cache, StepCache) != fused
        if not fused:
            assert (cache.native is not None) == native
            assert all(lin.transposed == transposed for layer in cache.linears for lin in layer.values())
        outs = []
        for i in range(split):
            position = torch.tensor([i], device=dev)
            outs.append(stack.step(x[:, i], position, cache, None if fixed else i + 1))
        cache.reorder(index, None if fixed else split)
        moved = x[index]
        after = [stack.step(moved[:, i], torch.tensor([i], device=dev), cache, None if fixed else i + 1)
                 for i in range(split, L)]
        expected_after = stack(torch.cat([x[index, :split], moved[:, split:]], dim=1), memory=full_memory,
                               memory_mask=full_mask)[:, split:]
    torch.testing.assert_close(torch.stack(outs, dim=1), full[:, :split], rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.stack(after, dim=1), expected_after, rtol=0, atol=ATOL)


def test_step_cache_checks_rows_against_the_memory():
    stack = _decoder(cross=True)
    memory, memory_mask = _memory()
    with pytest.raises(ValueError, match="multiple of the memory's batch"):
        stack.step_cache(4, L, memory=memory, memory_mask=memory_mask)


# ---------------------------------------------------------------------------------------------------------------
# 9. Gradients; 10. overflow through the stack.
# ---------------------------------------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    stack = TransformerStack(LAYERS, D, H, causal=True, cross_attention=True, d_memory=D_MEM).train()
    x = torch.randn(B, L, D)
    memory, memory_mask = _memory()
    memory.requires_grad_(True)
    out = stack(x, memory=memory, memory_mask=memory_mask)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert memory.grad is not None and torch.all(memory.grad[~memory_mask] == 0)  # padded frames: no gradient
    assert memory.grad[memory_mask].abs().sum() > 0


def test_decoder_cache_overflow_raises():
    stack = _decoder(cross=False)
    with torch.no_grad():
        cache = stack.make_cache(B, 4)
        stack(torch.randn(B, 3, D), cache=cache)
        with pytest.raises(ValueError, match="overflow"):
            stack(torch.randn(B, 2, D), cache=cache)


def test_regional_compilation_runs_compiled_blocks_only_in_training() -> None:
    torch.manual_seed(0)
    stack = TransformerStack(2, 16, 2, causal=True)
    x = torch.randn(2, 5, 16)
    expected = stack(x)
    calls = []
    stack.compile_blocks(backend="eager")
    for wrapper in stack._compiled_blocks:
        wrapper.register_forward_pre_hook(lambda m, a: calls.append(1))
    torch.testing.assert_close(stack(x), expected)  # grad on, no cache: the compiled blocks
    assert len(calls) == 2
    with torch.no_grad():
        stack(x)  # evaluation: the eager blocks
    cache = stack.make_cache(2, 5)
    with torch.no_grad():
        stack(x[:, :1], cache=cache)  # decoding: the eager blocks
    assert len(calls) == 2
    assert set(stack.state_dict()) == set(TransformerStack(2, 16, 2, causal=True).state_dict())
