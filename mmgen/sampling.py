"""Choosing the next token from logits: temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_sampling", "sample_next"]


def check_sampling(*, temperature: float = 1.0, top_p: float | None = None) -> None:
    """Check sampling settings up front (``mmgen generate`` does, before it writes anything): a ``ValueError`` saying
    what is accepted, with the same wording as :func:`sample_next`'s."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; accepted: >= 0 (0 is greedy)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}; accepted: 0 < top_p <= 1")


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Ids (b,) drawn from logits (b, v). ``temperature=0`` is greedy; top-k then top-p restrict the candidates."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; accepted: >= 0 (0 is greedy)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # shape: (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p}; accepted: 0 < top_p <= 1")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the ones before it already hold top_p of the mass; the first token always stays.
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
