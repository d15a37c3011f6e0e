"""The modality contract: what a plugin supplies so a task can turn raw data into tokens and back.

A modality class is the *processor* and the *renderer* at once (both are weight-free, picklable and share state such
as a vocabulary, so they run in data-loader workers and in the renderer alike); it builds the model-side *adapter*
(raw features -> tokens (b, s, d)) and *head* (tokens -> outputs) as ``nn.Module``s, and exposes a typed *spec* the
task reads instead of guessing. Its learned state (a vocabulary, normalisation constants) is plain JSON.

Convention: every ``__init__`` argument is stored on the instance under its own name, so :meth:`Modality.init_args`
can write it to a checkpoint and the class can be rebuilt from it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["AudioFileError", "AudioModality", "AudioSpec", "Batch", "ImageSpec", "LMHead", "Modality", "TextModality", "TextSpec", "TokenEmbedding",
           "VocabularyError"]


class VocabularyError(ValueError):
    """Text holds symbols the vocabulary does not have."""


class AudioFileError(ValueError):
    """An audio file cannot be used: unreadable, corrupt, empty or too short; the message names the file."""


@dataclass(frozen=True)
class TextSpec:
    """Vocabulary size and the reserved ids of a text modality."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    blank_id: int | None = None  # CTC blank, for speech recognition targets


@dataclass(frozen=True)
class ImageSpec:
    """Pixel layout of an image modality."""

    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class AudioSpec:
    """Sample rate, feature width and time resolution of an audio modality."""

    sample_rate: int
    num_features: int
    frame_rate: float  # feature frames per second, before the adapter
    subsampling: int  # the adapter's time reduction factor


@dataclass
class Batch:
    """A padded batch: ``values`` (b, s, ...) and ``mask`` (b, s), True on real positions."""

    values: Tensor
    mask: Tensor

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(dim=1)


class Modality(ABC):
    """Base of every modality plugin class; a task takes instances of subclasses by role (``text``, ``source``...)."""

    kind: ClassVar[str] = "abstract"

    @property
    @abstractmethod
    def spec(self) -> Any:
        """The typed spec (:class:`TextSpec`, :class:`ImageSpec`, :class:`AudioSpec`)."""

    @property
    def fitted(self) -> bool:
        """Whether the state needed for :attr:`spec` exists (a vocabulary built, say)."""
        return True

    def fit(self, items: Iterable[Any]) -> None:
        """Build state from training data (a vocabulary); no-op for stateless modalities."""

    @abstractmethod
    def encode(self, item: Any) -> Tensor:
        """One raw item -> features (a tensor whose first dimension is the sequence)."""

    @abstractmethod
    def collate(self, features: Sequence[Tensor]) -> Batch:
        """Pad a list of features into one :class:`Batch` with its mask."""

    @abstractmethod
    def render(self, output: Tensor) -> Any:
        """Model output -> what a user looks at (text, an image)."""

    @abstractmethod
    def adapter(self, d_model: int) -> nn.Module:
        """The model-side module: features -> tokens (b, s, d_model)."""

    @abstractmethod
    def head(self, d_model: int, adapter: nn.Module | None = None) -> nn.Module:
        """The model-side module: tokens (b, s, d_model) -> outputs; may share weights with ``adapter``."""

    def state_dict(self) -> dict[str, Any]:
        """Learned state as plain JSON types."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def init_args(self) -> dict[str, Any]:
        """The ``__init__`` arguments (JSON), read back from the attributes of the same names."""
        params = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in params if name != "self"}


class TokenEmbedding(nn.Module):
    """Token ids (b, s) -> embeddings (b, s, d)."""

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        return self.embedding(ids)


class LMHead(nn.Module):
    """Tokens (b, s, d) -> logits (b, s, vocab), optionally tied to a :class:`TokenEmbedding`."""

    def __init__(self, d_model: int, vocab_size: int, tie_to: TokenEmbedding | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size, bias=False)
        if tie_to is not None:
            self.proj.weight = tie_to.embedding.weight  # weight tying, as in GPT-2/nanoGPT
        else:
            nn.init.normal_(self.proj.weight, mean=0.0, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class TextModality(Modality):
    """A text modality: strings <-> id sequences with reserved pad/bos/eos/unk ids; ids are embedded and predicted."""

    kind: ClassVar[str] = "text"

    @abstractmethod
    def encode(self, item: str) -> Tensor:
        """A string -> ids (s,), int64, without bos/eos."""

    @abstractmethod
    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids -> string; special ids are dropped."""

    def render(self, output: Tensor) -> str:
        return self.decode(output)

    def collate(self, features: Sequence[Tensor]) -> Batch:
        values = nn.utils.rnn.pad_sequence(list(features), batch_first=True, padding_value=self.spec.pad_id)
        lengths = torch.tensor([len(f) for f in features])
        mask = torch.arange(values.shape[1])[None, :] < lengths[:, None]
        return Batch(values, mask)

    def adapter(self, d_model: int) -> nn.Module:
        return TokenEmbedding(self.spec.vocab_size, d_model)

    def head(self, d_model: int, adapter: nn.Module | None = None) -> nn.Module:
        return LMHead(d_model, self.spec.vocab_size, adapter if isinstance(adapter, TokenEmbedding) else None)


class AudioModality(Modality):
    """An audio modality: a sound file (or a waveform) -> feature frames (s, num_features) -> tokens (b, s', d).

    The adapter returned by :meth:`adapter` is called as ``adapter(values, mask)`` on a padded :class:`Batch` of
    features and returns ``(tokens, mask)``: it may reduce time (``spec.subsampling``), and
    :meth:`output_lengths` says to how many tokens.
    """

    kind: ClassVar[str] = "audio"

    @property
    @abstractmethod
    def spec(self) -> AudioSpec:
        """Sample rate, feature width, frame rate and the adapter's subsampling."""

    @abstractmethod
    def load(self, path: Any) -> Tensor:
        """A sound file -> mono waveform (n,) float32 at ``spec.sample_rate``; :class:`AudioFileError` names a bad
        file."""

    @abstractmethod
    def num_frames(self, num_samples: int) -> int:
        """Feature frames of a waveform of ``num_samples`` samples at ``spec.sample_rate``."""

    @abstractmethod
    def output_lengths(self, frames: Tensor) -> Tensor:
        """Tokens the adapter makes of utterances of ``frames`` feature frames (int tensor in, int tensor out)."""

    def tokens_for(self, seconds: float) -> int:
        """Tokens the adapter makes of a clip of ``seconds`` seconds."""
        frames = self.num_frames(round(seconds * self.spec.sample_rate))
        return int(self.output_lengths(torch.tensor([frames]))[0])

    def collate(self, features: Sequence[Tensor]) -> Batch:
        values = nn.utils.rnn.pad_sequence(list(features), batch_first=True, padding_value=0.0)
        lengths = torch.tensor([len(f) for f in features])
        mask = torch.arange(values.shape[1])[None, :] < lengths[:, None]
        return Batch(values, mask)

    def encode_batch(self, waves: Sequence[Tensor], names: Sequence[str] | None = None) -> Batch:
        """Mono waveforms (n_i,) at ``spec.sample_rate`` -> one padded :class:`Batch` of features, each as
        :meth:`encode` gives it alone (to rounding), on the waveforms' device; ``names`` (file names) label errors.
        This default encodes one waveform at a time; a plugin may override it with one batched computation."""
        out = []
        for i, wave in enumerate(waves):
            try:
                out.append(self.encode((wave, self.spec.sample_rate)))
            except AudioFileError as exc:
                raise AudioFileError(f"audio file {names[i]}: {exc}" if names else str(exc)) from None
        return self.collate(out)
