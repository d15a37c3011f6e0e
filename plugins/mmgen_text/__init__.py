"""mmgen's built-in text plugin: a character tokeniser whose vocabulary is built from the corpus.

Registered through the entry-point group ``mmgen`` in mmgen's own ``pyproject.toml``, as any third-party plugin is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor

from mmgen.hookspecs import hookimpl
from mmgen.modality import TextModality, TextSpec, VocabularyError

__all__ = ["CharTokenizer"]

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def _show(chars: Iterable[str], limit: int = 20) -> str:
    chars = sorted(chars)
    shown = " ".join(repr(c) for c in chars[:limit])
    return shown + (f" ... ({len(chars)} in all)" if len(chars) > limit else "")


class CharTokenizer(TextModality):
    """One id per character; ids 0-3 are pad, bos, eos, unk, then the corpus's characters in code-point order.

    Args:
        unknown: what a character outside the vocabulary does: ``"error"`` raises an error listing the unseen
            characters; ``"unk"`` maps them to the unk id.
    """

    def __init__(self, unknown: Literal["error", "unk"] = "error") -> None:
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown={unknown!r}; accepted: 'error' or 'unk'")
        self.unknown = unknown
        self.chars: str = ""

    # ---- state ----
    @property
    def fitted(self) -> bool:
        return bool(self.chars)

    def fit(self, items: Iterable[str]) -> None:
        seen: set[str] = set()
        for text in items:
            seen.update(np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)).tolist())
        if not seen:
            raise VocabularyError("cannot build a character vocabulary from empty text")
        self.chars = "".join(chr(c) for c in sorted(seen))

    def state_dict(self) -> dict[str, Any]:
        return {"chars": self.chars}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chars = state["chars"]

    @property
    def spec(self) -> TextSpec:
        if not self.fitted:
            raise RuntimeError("CharTokenizer has no vocabulary yet: fit it on a corpus or load a checkpoint")
        return TextSpec(vocab_size=len(SPECIALS) + len(self.chars), pad_id=0, bos_id=1, eos_id=2, unk_id=3)

    # ---- processing ----
    def _codes(self) -> np.ndarray:
        return np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)

    def unseen(self, text: str) -> set[str]:
        """The characters of ``text`` that the vocabulary lacks."""
        codes = np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
        return {chr(c) for c in np.setdiff1d(codes, self._codes()).tolist()}

    def encode(self, item: str) -> Tensor:
        spec = self.spec
        codes = np.frombuffer(item.encode("utf-32-le"), dtype=np.uint32)
        vocab = self._codes()  # sorted, so a binary search maps each code point to its index
        pos = np.searchsorted(vocab, codes).clip(max=len(vocab) - 1)
        known = vocab[pos] == codes
        if not known.all():
            if self.unknown == "error":
                missing = {chr(c) for c in codes[~known].tolist()}
                raise VocabularyError(
                    f"text has {len(missing)} character(s) outside the vocabulary of {spec.vocab_size} ids "
                    f"({len(self.chars)} characters): {_show(missing)}; set `unknown: unk` to map them to <unk>")
        ids = np.where(known, pos + len(SPECIALS), spec.unk_id)
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        n = len(SPECIALS)
        return "".join(self.chars[i - n] for i in ids if n <= i < n + len(self.chars))


@hookimpl
def mmgen_register_modalities(register: Callable[[type], None]) -> None:
    register(CharTokenizer)
