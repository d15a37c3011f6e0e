"""An example third-party mmgen plugin: a byte-level text tokeniser.

Ids 0-3 are pad, bos, eos, unk (as in mmgen's CharTokenizer); byte ``b`` is id ``4 + b``, so the vocabulary is always
260 ids and nothing needs fitting. Any string encodes (as its UTF-8 bytes); decoding replaces invalid byte sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

from mmgen.hookspecs import hookimpl
from mmgen.modality import TextModality, TextSpec

__all__ = ["ByteTokenizer"]

NUM_SPECIALS = 4  # pad, bos, eos, unk


class ByteTokenizer(TextModality):
    """One id per UTF-8 byte: byte ``b`` -> id ``4 + b``; ids 0-3 are pad, bos, eos, unk. Needs no fitting."""

    def __init__(self) -> None:
        pass

    @property
    def fitted(self) -> bool:
        return True

    @property
    def spec(self) -> TextSpec:
        return TextSpec(vocab_size=NUM_SPECIALS + 256, pad_id=0, bos_id=1, eos_id=2, unk_id=3)

    def encode(self, item: str) -> Tensor:
        return torch.tensor(list(item.encode("utf-8")), dtype=torch.int64) + NUM_SPECIALS

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        data = bytes(i - NUM_SPECIALS for i in ids if NUM_SPECIALS <= i < NUM_SPECIALS + 256)
        return data.decode("utf-8", errors="replace")


@hookimpl
def mmgen_register_modalities(register: Callable[[type], None]) -> None:
    register(ByteTokenizer)
