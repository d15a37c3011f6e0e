"""Tests of :class:`mmgen.blocks.attention.MultiHeadAttention` and :class:`KVCache`.

Every numerical check compares the module with the plain formula ``softmax(Q Kᵀ / √e) V`` written out by hand
from the module's own projection weights (see :func:`reference_attention`), in float64.

Mask polarity (the package's): a boolean mask is True where attention is allowed; a key padding mask (b, t) is
True on real tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmgen.blocks.attention import KVCache, MultiHeadAttention

B, S, D, H = 2, 5, 16, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _project(linear: torch.nn.Linear, inp: torch.Tensor, heads: int) -> torch.Tensor:
    """``inp @ Wᵀ + b`` split into heads: (b, n, heads * e) -> (b, heads, n, e)."""
    y = inp @ linear.weight.T
    if linear.bias is not None:
        y = y + linear.bias
    b, n, width = y.shape
    return y.view(b, n, heads, width // heads).transpose(1, 2)


def reference_attention(mha: MultiHeadAttention, x: torch.Tensor, context: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook formula from ``mha``'s weights; ``mask`` broadcasts to (b, h, s, t), True = may attend.

    A query with no allowed key gets all-zero weights (and so, without an output bias, a zero output).
    Returns the output (b, s, d_out) and the weights (b, h, s, t).
    """
    context = x if context is None else context
    h = mha.num_heads
    q = _project(mha.q_proj, x, h)
    k = _project(mha.k_proj, context, h)
    v = _project(mha.v_proj, context, h)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(dim=-1), nan=0.0)  # fully masked rows: NaN -> 0
    heads_out = weights @ v  # (b, h, s, f)
    b, _, s, f = heads_out.shape
    out = heads_out.transpose(1, 2).reshape(b, s, h * f) @ mha.out_proj.weight.T
    if mha.out_proj.bias is not None:
        out = out + mha.out_proj.bias
    return out, weights


def _padding(b: int, t: int, lengths: list[int]) -> torch.Tensor:
    """(b, t) key padding mask, True on the first ``lengths[i]`` positions of row ``i``."""
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]


def _causal(s: int, t: int) -> torch.Tensor:
    return torch.ones(s, t, dtype=torch.bool).tril()


# ---------------------------------------------------------------------------------------------------------------
# 1, 2, 6. The module equals the formula, on the SDPA path and on the need_weights path.
# ---------------------------------------------------------------------------------------------------------------

def _case(name: str):
    """Module kwargs, call kwargs and the equivalent full boolean mask for the reference, for one mask case."""
    x = torch.randn(B, S, D, dtype=torch.float64)
    kpm = _padding(B, S, [S, 3])
    if name == "none":
        return {}, dict(x=x), dict(x=x)
    if name == "causal":
        return {}, dict(x=x, causal=True), dict(x=x, mask=_causal(S, S))
    if name == "padding":
        return {}, dict(x=x, key_padding_mask=kpm), dict(x=x, mask=kpm[:, None, None, :])
    if name == "attn_mask":
        m = torch.rand(S, S) < 0.5
        m |= torch.eye(S, dtype=torch.bool)  # every query keeps at least one key
        return {}, dict(x=x, attn_mask=m), dict(x=x, mask=m)
    if name == "attn_mask_4d":
        m = torch.rand(B, 1, S, S) < 0.5
        m |= torch.eye(S, dtype=torch.bool)
        return {}, dict(x=x, attn_mask=m), dict(x=x, mask=m)
    if name == "padding+attn_mask":  # the two masks must be intersected, not united
        m = torch.rand(S, S) < 0.5
        m |= torch.eye(S, dtype=torch.bool)
        return {}, dict(x=x, key_padding_mask=kpm, attn_mask=m), dict(x=x, mask=m & kpm[:, None, None, :])
    if name == "causal+padding":
        kpm = _padding(B, S, [S, 4])
        return {}, dict(x=x, causal=True, key_padding_mask=kpm), dict(x=x, mask=_causal(S, S) & kpm[:, None, None, :])
    if name == "cross":
        t, d_ctx = 7, 12
        ctx = torch.randn(B, t, d_ctx, dtype=torch.float64)
        kpm = _padding(B, t, [t, 4])
        return (dict(d_context=d_ctx), dict(x=x, context=ctx, key_padding_mask=kpm),
                dict(x=x, context=ctx, mask=kpm[:, None, None, :]))
    raise AssertionError(name)


CASES = ["none", "causal", "padding", "attn_mask", "attn_mask_4d", "padding+attn_mask", "causal+padding",
         "cross"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_formula(case, need_weights, bias):
    module_kw, call_kw, ref_kw = _case(case)
    mha = MultiHeadAttention(D, H, bias=bias, **module_kw).double().eval()
    expected_out, expected_w = reference_attention(mha, **ref_kw)
    result = mha(need_weights=need_weights, **call_kw)
    if need_weights:
        out, weights = result
        torch.testing.assert_close(weights, expected_w.expand_as(weights), rtol=0, atol=1e-10)
        # Each row sums to 1, except rows with no allowed key (possible in "padding+attn_mask"), which are all 0.
        live = (expected_w.sum(-1) > 0).expand(weights.shape[:-1]).to(weights.dtype)
        torch.testing.assert_close(weights.sum(-1), live, rtol=0, atol=1e-12)
    else:
        out = result
    assert out.shape == expected_out.shape
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_need_weights_path_equals_sdpa_path(case):
    module_kw, call_kw, _ = _case(case)
    mha = MultiHeadAttention(D, H, dropout=0.0, **module_kw).double()  # training mode, but dropout is 0
    fast = mha(**call_kw)
    slow, _ = mha(need_weights=True, **call_kw)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)


@pytest.mark.parametrize("need_weights", [False, True])
def test_distinct_qk_and_value_widths(need_weights):
    d_model, heads, d_qk, d_v, d_out = 12, 2, 8, 32, 16
    mha = MultiHeadAttention(d_model, heads, d_qk=d_qk, d_v=d_v, d_out=d_out).double()
    assert (mha.q_proj.weight.shape, mha.k_proj.weight.shape) == ((d_qk, d_model), (d_qk, d_model))
    assert (mha.v_proj.weight.shape, mha.out_proj.weight.shape) == ((d_v, d_model), (d_out, d_v))
    x = torch.randn(B, S, d_model, dtype=torch.float64)
    kpm = _padding(B, S, [S, 2])
    expected, expected_w = reference_attention(mha, x, mask=_causal(S, S) & kpm[:, None, None, :])
    result = mha(x, causal=True, key_padding_mask=kpm, need_weights=need_weights)
    out = result[0] if need_weights else result
    assert out.shape == (B, S, d_out)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    if need_weights:
        torch.testing.assert_close(result[1], expected_w, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# 3. Causality.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])  # is_causal kernel vs explicit causal mask
def test_future_tokens_do_not_change_earlier_outputs(need_weights, with_padding):
    s = 8
    mha = MultiHeadAttention(D, H).eval()
    kpm = _padding(B, s, [s, s]) if with_padding else None  # all real: same maths, other code path
    x = torch.randn(B, s, D)
    for cut in range(1, s):
        x2 = x.clone()
        x2[:, cut:] = torch.randn(B, s - cut, D) * 10
        out1 = mha(x, causal=True, key_padding_mask=kpm, need_weights=need_weights)
        out2 = mha(x2, causal=True, key_padding_mask=kpm, need_weights=need_weights)
        if need_weights:
            (out1, w1), (out2, w2) = out1, out2
            assert torch.all(w1.triu(1) == 0) and torch.all(w2.triu(1) == 0)
        assert torch.equal(out1[:, :cut], out2[:, :cut])
        assert not torch.equal(out1[:, cut:], out2[:, cut:])


# ---------------------------------------------------------------------------------------------------------------
# 4, 5. Padding and fully masked rows.
# ---------------------------------------------------------------------------------------------------------------

def test_padded_keys_get_exactly_zero_weight():
    lengths = [S, 3]
    kpm = _padding(B, S, lengths)
    mha = MultiHeadAttention(D, H)
    _, weights = mha(torch.randn(B, S, D), key_padding_mask=kpm, need_weights=True)
    assert torch.all(weights.masked_select(~kpm[:, None, None, :].expand_as(weights)) == 0)
    assert torch.all(weights[1, :, :, : lengths[1]] > 0)


@pytest.mark.parametrize("need_weights", [False, True])
def test_padded_positions_do_not_affect_real_queries(need_weights):
    lengths = [S, 3]
    kpm = _padding(B, S, lengths)

    def run(mha, *args):
        out = mha(*args, key_padding_mask=kpm, need_weights=need_weights)
        return out[0] if need_weights else out

    # Self-attention: garbage at padded positions changes their keys, values (and their own queries).
    mha = MultiHeadAttention(D, H).eval()
    x = torch.randn(B, S, D)
    x2 = x.clone()
    x2[1, lengths[1]:] = torch.randn(S - lengths[1], D) * 100
    out1, out2 = run(mha, x), run(mha, x2)
    assert torch.equal(out1[0], out2[0])
    assert torch.equal(out1[1, : lengths[1]], out2[1, : lengths[1]])

    # Cross-attention: garbage in padded context frames changes no query's output at all.
    cross = MultiHeadAttention(D, H, d_context=12).eval()
    ctx = torch.randn(B, S, 12)
    ctx2 = ctx.clone()
    ctx2[1, lengths[1]:] = torch.randn(S - lengths[1], 12) * 100
    assert torch.equal(run(cross, x, ctx), run(cross, x, ctx2))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("how", ["key_padding", "attn_mask_row"])
def test_fully_masked_row_is_finite_and_zero(how, need_weights):
    mha = MultiHeadAttention(D, H).double()  # no biases, so a zero attention output stays zero after out_proj
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    if how == "key_padding":
        kw = dict(key_padding_mask=_padding(B, S, [S, 0]))  # batch item 1: every key is padding
        dead = (torch.tensor([1]), slice(None))
    else:
        m = torch.ones(S, S, dtype=torch.bool)
        m[2] = False  # query 2 may attend to nothing, in every batch item
        kw = dict(attn_mask=m)
        dead = (slice(None), torch.tensor([2]))
    result = mha(x, need_weights=need_weights, **kw)
    out = result[0] if need_weights else result
    assert torch.isfinite(out).all()
    assert torch.all(out[dead] == 0)
    if need_weights:
        assert torch.all(result[1][dead[0], :, dead[1]] == 0)
    out.sum().backward()
    grads = [x.grad] + [p.grad for p in mha.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if how == "key_padding":
        assert torch.all(x.grad[1] == 0)  # nothing of item 1 reaches any output
    # The live rows still match the formula.
    mask = kw["key_padding_mask"][:, None, None, :] if how == "key_padding" else kw["attn_mask"]
    expected, _ = reference_attention(mha, x.detach(), mask=mask)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# KV cache at the module level.
# ---------------------------------------------------------------------------------------------------------------

def test_cached_self_attention_matches_full_pass_with_padding():
    s = 8
    mha = MultiHeadAttention(D, H).double().eval()
    x = torch.randn(B, s, D, dtype=torch.float64)
    kpm = torch.ones(B, s, dtype=torch.bool)
    kpm[1, :2] = False  # left padding in item 1: its first query sees no key at all
    full = mha(x, causal=True, key_padding_mask=kpm)
    cache = KVCache(B, H, s, mha.d_head_qk, mha.d_head_v, dtype=torch.float64)
    outs, start = [], 0
    for n in [3, 1, 4]:
        outs.append(mha(x[:, start:start + n], causal=True, key_padding_mask=kpm[:, :start + n], cache=cache))
        start += n
    assert cache.length == s
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-12)
    assert torch.all(full[1, 0] == 0)


def test_kv_cache_overflow_raises():
    cache = KVCache(1, 2, 4, 3, 5)
    cache.append(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 5))
    with pytest.raises(ValueError, match="overflow"):
        cache.append(torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 5))
    assert cache.length == 3  # a refused append stores nothing
    cache.append(torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 5))  # exactly full is fine
    assert cache.length == 4

    mha = MultiHeadAttention(D, H)
    cache = KVCache(B, H, 4, mha.d_head_qk, mha.d_head_v)
    mha(torch.randn(B, 4, D), causal=True, cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        mha(torch.randn(B, 1, D), causal=True, cache=cache)


# ---------------------------------------------------------------------------------------------------------------
# 11. Construction.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, numbers", [
    (dict(d_model=10, num_heads=3), ["d_qk=10", "num_heads=3"]),
    (dict(d_model=16, num_heads=4, d_qk=10), ["d_qk=10", "num_heads=4"]),
    (dict(d_model=16, num_heads=4, d_v=6), ["d_v=6", "num_heads=4"]),
])
def test_bad_head_split_raises(kwargs, numbers):
    with pytest.raises(ValueError) as info:
        MultiHeadAttention(**kwargs)
    for n in numbers:
        assert n in str(info.value)
