"""Speech data: JSONL manifests of a user's recordings, the Free Spoken Digit Dataset, and length-bucketed batches.

A manifest has one JSON object per line: ``{"audio": "clips/a.wav", "text": "hello world", "speaker": "s1"}``
(``speaker`` optional; relative audio paths are relative to the manifest's folder). Batches hold utterances of
similar length, at most ``max_batch_seconds`` of padded audio each.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mmgen.ctc import min_ctc_frames
from mmgen.data.augment import WaveAugment
from mmgen.data.paths import DataFileError, resolve
from mmgen.data.rng import rng_state, set_rng_state
from mmgen.modality import AudioFileError, AudioModality, Modality, TextModality, VocabularyError

__all__ = ["DurationBatchSampler", "FSDDDataModule", "ManifestDataModule", "ManifestError", "ResumableLoader",
           "SpeechDataModule", "Utterance", "WaveAugment", "connected_digits", "fsdd_splits", "fsdd_utterances",
           "read_manifest", "write_manifest"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class ManifestError(DataFileError):
    """A manifest line that cannot be used; the message gives the file and line number."""


@dataclass(frozen=True)
class Utterance:
    """One training example: audio (one file, or several joined by silence) and its transcript."""

    audio: tuple[str, ...]
    text: str
    speaker: str | None = None
    duration: float = 0.0  # seconds, from the file headers (and the gaps)
    where: str = ""  # "manifest.jsonl:12", for error messages


def _duration(path: Path, where: str) -> float:
    if not path.is_file():
        raise AudioFileError(f"{where}: audio file not found: {path}")
    if path.stat().st_size == 0:
        raise AudioFileError(f"{where}: audio file {path} is empty (0 bytes)")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioFileError(f"{where}: cannot read audio file {path}: {exc}; accepted: WAV or FLAC") from None
    if info.frames == 0:
        raise AudioFileError(f"{where}: audio file {path} has no samples")
    return info.frames / info.samplerate


def read_manifest(path: str | Path, *, skip_bad: bool = False) -> tuple[list[Utterance], list[str]]:
    """The utterances of a JSONL manifest and, with ``skip_bad``, the problems of the lines it skipped."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}; accepted: a JSONL file with one "
                            '{"audio": PATH, "text": TRANSCRIPT} object per line')
    items, problems = [], []
    root = path.parent
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); accepted: "
                                    '{"audio": PATH, "text": TRANSCRIPT, "speaker": NAME (optional)}') from None
            if not isinstance(row, dict) or not isinstance(row.get("audio"), str) \
                    or not isinstance(row.get("text"), str):
                raise ManifestError(f"{where}: expected an object with string fields \"audio\" and \"text\", got "
                                    f"{line.strip()[:120]}")
            audio = Path(row["audio"]).expanduser()
            audio = audio if audio.is_absolute() else root / audio
            speaker = row.get("speaker")
            items.append(Utterance((str(audio),), row["text"], None if speaker is None else str(speaker),
                                   _duration(audio, where), where))
        except (ManifestError, AudioFileError) as exc:
            if not skip_bad:
                raise
            problems.append(str(exc))
    if not items and not problems:
        raise ManifestError(f"manifest {path} has no utterances")
    return items, problems


def write_manifest(path: str | Path, items: Sequence[Utterance]) -> None:
    """Write single-file utterances as a JSONL manifest (absolute audio paths)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for u in items:
            row: dict[str, Any] = {"audio": str(Path(u.audio[0]).resolve()), "text": u.text}
            if u.speaker is not None:
                row["speaker"] = u.speaker
            f.write(json.dumps(row) + "\n")


# ---- Free Spoken Digit Dataset ----
def fsdd_utterances(folder: Path) -> list[Utterance]:
    """Every ``DIGIT_SPEAKER_INDEX.wav`` under ``folder``, transcribed as the digit's word."""
    files = sorted(folder.glob("*.wav"))
    if not files:
        raise DataFileError(f"no FSDD recordings (DIGIT_SPEAKER_INDEX.wav) in {folder}")
    items = []
    for f in files:
        parts = f.stem.split("_")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
            raise DataFileError(f"{f}: not an FSDD file name; accepted: DIGIT_SPEAKER_INDEX.wav, e.g. 3_theo_17.wav")
        items.append(Utterance((str(f),), DIGIT_WORDS[int(parts[0])], parts[1], _duration(f, str(f)),
                               f"{f.name}"))
    return items


def _fsdd_index(u: Utterance) -> int:
    return int(Path(u.audio[0]).stem.split("_")[2])


def fsdd_splits(items: Sequence[Utterance], split: str, test_speaker: str | None = None
                ) -> dict[str, list[Utterance]]:
    """``standard``: index 0-4 of each digit and speaker is test, 5-9 validation, the rest training.
    ``speaker``: every recording of ``test_speaker`` is test; of the others, index 5-9 is validation, the rest
    training."""
    out: dict[str, list[Utterance]] = {"train": [], "val": [], "test": []}
    if split == "standard":
        for u in items:
            i = _fsdd_index(u)
            out["test" if i < 5 else "val" if i < 10 else "train"].append(u)
    elif split == "speaker":
        speakers = sorted({u.speaker for u in items})
        if test_speaker not in speakers:
            raise ValueError(f"test_speaker={test_speaker!r} is not in the data; accepted: {', '.join(speakers)}")
        for u in items:
            out["test" if u.speaker == test_speaker else "val" if 5 <= _fsdd_index(u) < 10 else "train"].append(u)
    else:
        raise ValueError(f"split={split!r}; accepted: 'standard' or 'speaker'")
    return out


def connected_digits(items: Sequence[Utterance], count: int, lengths: tuple[int, int], gap: float,
                     seed: int) -> list[Utterance]:
    """``count`` sequences of ``lengths[0]``-``lengths[1]`` recordings of one speaker each, joined by ``gap``
    seconds of silence; the transcript is their words separated by spaces. Fixed by ``seed``."""
    by_speaker: dict[str, list[Utterance]] = defaultdict(list)
    for u in items:
        by_speaker[u.speaker or ""].append(u)
    speakers = sorted(by_speaker)
    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        pool = by_speaker[speakers[rng.integers(len(speakers))]]
        picks = [pool[j] for j in rng.integers(len(pool), size=int(rng.integers(lengths[0], lengths[1] + 1)))]
        out.append(Utterance(tuple(p.audio[0] for p in picks), " ".join(p.text for p in picks), picks[0].speaker,
                             sum(p.duration for p in picks) + gap * (len(picks) - 1), f"connected #{n}"))
    return out


# ---- batching ----
JITTER_SCALES = (1.0, 0.5, 0.25, 0.125, 0.0)  # of the +-10 % length jitter, tried in turn (see _batches)


class DurationBatchSampler(Sampler[list[int]]):
    """Batches of utterances of similar duration, each at most ``max_seconds`` of padded audio (and at most
    ``max_batch_size`` utterances). With ``shuffle``, lengths are jittered by +-10 % before sorting and the batch
    order is drawn from ``(seed, epoch)``, and every epoch has as many batches as the first. Each rank takes every
    ``world``-th batch: in training all ranks the same number (the remainder is left out, so they step together);
    without ``shuffle`` (validation, test) every batch, so an evaluation reads every utterance once. With
    ``keyed``, a batch lists ``(epoch, index)`` pairs instead of indices, so the data set can draw an utterance's
    augmentation from ``(seed, epoch, index)`` in whichever loader worker fetches it.

    Resuming (:class:`ResumableLoader`): :meth:`resume` makes the next pass of a checkpoint's epoch start at the first
    batch it had not trained on; ``len`` stays the whole epoch (Lightning counts the batches done itself)."""

    def __init__(self, durations: Sequence[float], max_seconds: float, *, shuffle: bool = False, seed: int = 0,
                 max_batch_size: int | None = None, rank: int = 0, world: int = 1, keyed: bool = False) -> None:
        self.durations = np.asarray(durations, dtype=np.float64)
        if len(self.durations) and self.durations.max() > max_seconds:
            raise ValueError(f"an utterance of {self.durations.max():.1f} s exceeds max_batch_seconds={max_seconds}; "
                             "raise it")
        self.max_seconds, self.shuffle, self.seed = max_seconds, shuffle, seed
        self.max_batch_size, self.rank, self.world, self.keyed = max_batch_size, rank, world, keyed
        self.epoch = 0
        # Lightning calls set_epoch on `dataloader.sampler` and `dataloader.batch_sampler.sampler`, not on a batch
        # sampler itself: this attribute is how each epoch reaches us.
        self.sampler = _EpochSetter(self)
        self._count: int | None = None  # batches per epoch, before sharding
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        self._align = False  # the next set_epoch names the checkpoint's epoch
        self._offset = 0  # Lightning's epoch number minus ours
        self.pass_epoch, self.pass_start = 0, 0  # the epoch of the latest pass and the batch it begins at

    def set_epoch(self, epoch: int) -> None:
        # After a resume, Lightning's first set_epoch is for the checkpoint's epoch, whatever number it gives it: in
        # a checkpoint written when training ended (at `max_steps`, mid-epoch or not) Lightning has already counted
        # that epoch as done, so it numbers the rest of it, and every later epoch, one higher. Ours stay the numbers
        # of the run trained straight through.
        if self._align:
            self._offset, self._align = epoch - self.epoch, False
        self.epoch = epoch - self._offset

    def _pack(self, keys: np.ndarray) -> list[list[int]]:
        """Utterances in the order of ``keys``, cut into batches greedily within the budget."""
        batches, current, longest = [], [], 0.0
        for i in np.argsort(keys, kind="stable").tolist():
            d = self.durations[i]
            full = self.max_batch_size is not None and len(current) >= self.max_batch_size
            if current and (max(longest, d) * (len(current) + 1) > self.max_seconds or full):
                batches.append(current)
                current, longest = [], 0.0
            current.append(i)
            longest = max(longest, d)
        if current:
            batches.append(current)
        return batches

    def _batches_per_epoch(self) -> int:
        # Lightning reads a loader's length once and ends every epoch at that many batches, and a resumed run reads
        # it in the resumed epoch: a length that changed from epoch to epoch would drop batches, and differently
        # after a resume. Every epoch has the first epoch's count (or the unjittered one, if larger: always reachable).
        if self._count is None:
            jitter = np.random.default_rng([self.seed, 0]).uniform(0.9, 1.1, len(self.durations))
            self._count = max(len(self._pack(self.durations * jitter)), len(self._pack(self.durations)))
        return self._count

    def _batches(self) -> list[list[int]]:
        if not self.shuffle:
            batches = self._pack(self.durations)
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            jitter = rng.uniform(0.9, 1.1, len(self.durations))
            count = self._batches_per_epoch()
            # The jitter packs a little worse or better from epoch to epoch: with fewer batches than `count`, the
            # fullest are halved; with more, the jitter is narrowed until they fit (unjittered, they always do).
            for scale in JITTER_SCALES:
                batches = self._pack(self.durations * (1 + (jitter - 1) * scale))
                if len(batches) <= count:
                    break
            while len(batches) < count:
                j = max(range(len(batches)), key=lambda k: len(batches[k]))
                half = len(batches[j]) // 2
                batches[j:j + 1] = [batches[j][:half], batches[j][half:]]
            batches = [batches[j] for j in rng.permutation(len(batches))]
        per_rank = len(batches) // self.world if self.shuffle and self.world > 1 else len(batches)
        return batches[self.rank::self.world][:per_rank]

    def begin_pass(self) -> None:
        """A new pass over the current epoch begins (a loader's iteration; the batch sampler itself may be iterated
        more than once per pass: a loader with workers does). It starts where a checkpoint of this epoch left off."""
        start = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            start = done if epoch == self.epoch else 0  # (a later epoch starts at its first batch)
        self.pass_epoch, self.pass_start = self.epoch, start

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        batches = self._batches()
        start = self.pass_start if self.pass_epoch == self.epoch else 0
        if self.keyed:
            return iter([[(self.epoch, i) for i in b] for b in batches[start:]])
        return iter(batches[start:])

    def __len__(self) -> int:
        if self.shuffle:
            count = self._batches_per_epoch()
            return count // self.world if self.world > 1 else count
        return len(self._batches())

    def resume(self, epoch: int, batches: int) -> None:
        """Continue a checkpoint's pass: the next pass of ``epoch`` starts at batch ``batches``, and the next
        :meth:`set_epoch` names ``epoch``."""
        self.epoch, self._resume, self._align = epoch, (epoch, batches), True
        self.pass_epoch, self.pass_start = epoch, batches


class _EpochSetter:
    """Forwards ``set_epoch`` to the batch sampler that owns it."""

    def __init__(self, owner: DurationBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class ResumableLoader(DataLoader):
    """A training loader that Lightning checkpoints and resumes mid-epoch.

    Lightning saves ``state_dict()`` of every training loader that has one (its ``_Stateful`` protocol) in the fit
    loop's checkpoint state and hands it back to ``load_state_dict`` before it iterates again; a plain
    ``DataLoader`` has none, so a resumed run restarted the interrupted epoch from its first batch. The state is the
    epoch and the batches of it this loader has yielded: counted here, at the consumer's side, not in the batch
    sampler, whose indices the loader workers prefetch ahead of training (Lightning itself prefetches nothing from
    a loader with a length). Iteration is deferred to the first batch, so that a resumed pass is built after
    Lightning's ``set_epoch``: a ``DataLoader`` with workers draws its first batches of indices as soon as it is
    iterated, and Lightning iterates a resumed loader before it sets the epoch."""

    batch_sampler: DurationBatchSampler

    def __iter__(self) -> Iterator[Any]:
        return self._counting()

    def _counting(self) -> Iterator[Any]:
        self._yielded = 0
        self.batch_sampler.begin_pass()
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        s = self.batch_sampler
        return {"epoch": int(s.pass_epoch), "batches": int(s.pass_start + getattr(self, "_yielded", 0))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.resume(int(state["epoch"]), int(state["batches"]))
        self._yielded = 0


class UtteranceDataset(Dataset):
    """Utterance -> (features, label ids, transcript). With ``cache``, waveforms (per file) and features are kept in
    memory after their first use; with ``speeds`` (training only), each fetch plays the utterance at a speed drawn
    from that list (Kaldi-style speed perturbation: resampled, so tempo and pitch change together), then, with
    ``augment`` (training only), through a random :class:`WaveAugment`; either way its features are recomputed at
    every fetch (only the waveforms are cached).

    Items are fetched by index, or by ``(epoch, index)`` (what a ``keyed`` :class:`DurationBatchSampler` yields):
    the random draws of such a fetch come from ``(seed, epoch, index)`` alone, so they are the same in any loader
    worker and after a resume. A fetch by index draws from the data set's own generator, seeded by ``seed`` (and,
    in a loader worker, its id)."""

    def __init__(self, items: Sequence[Utterance], source: AudioModality, target: TextModality, gap: float,
                 cache: bool, skip_bad: bool, speeds: Sequence[float] | None = None, seed: int = 0,
                 labels: Sequence[Tensor] | None = None, augment: WaveAugment | None = None) -> None:
        self.items, self.source, self.target = list(items), source, target
        # Label ids, encoded once (the data module's check has already encoded them).
        self.labels = list(labels) if labels is not None else [target.encode(u.text) for u in self.items]
        self.gap, self.cache, self.skip_bad = gap, cache, skip_bad
        self.speeds = tuple(speeds) if speeds else None
        self.augment = augment
        self.perturbed = self.speeds is not None or augment is not None  # features differ at every fetch
        self.seed, self.rng, self._rng_worker = seed, np.random.default_rng(seed), None
        self._features: dict[int, Tensor] = {}
        self._waves: dict[str, Tensor] = {}
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, path: str) -> Tensor:
        wave = self._waves.get(path)
        if wave is None:
            wave = self.source.load(path)
            if self.cache and self.perturbed:
                self._waves[path] = wave
        return wave

    def waveform(self, i: int) -> Tensor:
        """The utterance's waveform at the model's rate (several files joined by ``gap`` seconds of silence)."""
        u = self.items[i]
        if len(u.audio) == 1:
            return self._load(u.audio[0])
        silence = torch.zeros(round(self.gap * self.source.spec.sample_rate))
        return torch.cat([w for p in u.audio for w in (self._load(p), silence)][:-1])

    def _draws(self) -> np.random.Generator:
        """The generator of speeds and augmentation; a loader worker reseeds its copy from ``(seed, worker id)``, so
        workers do not repeat each other's draws."""
        info = torch.utils.data.get_worker_info()
        if info is not None and self._rng_worker != info.id:
            self.rng, self._rng_worker = np.random.default_rng([self.seed, info.id]), info.id
        return self.rng

    def draws(self, epoch: int, i: int) -> np.random.Generator:
        """The generator of utterance ``i``'s speed and augmentation in ``epoch``."""
        return np.random.default_rng([self.seed, epoch, i])

    def features(self, i: int, rng: np.random.Generator | None = None) -> Tensor:
        """Utterance ``i``'s features; its random draws (if any) from ``rng``, by default the data set's own."""
        if i in self._features:
            return self._features[i]
        u = self.items[i]
        try:
            wave = self.waveform(i)
            rate = self.source.spec.sample_rate
            if self.perturbed and rng is None:
                rng = self._draws()
            if self.speeds:
                speed = float(rng.choice(self.speeds))
                if speed != 1.0:
                    wave = torchaudio.functional.resample(wave, round(rate * speed), rate)
            if self.augment is not None:
                wave = self.augment(wave, rate, rng)
            feats = self.source.features(wave)
        except AudioFileError as exc:
            raise AudioFileError(f"{u.where}: {exc}" if u.where and u.where not in str(exc) else str(exc)) from None
        if self.cache and not self.perturbed:
            self._features[i] = feats
        return feats

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, str] | None:
        if isinstance(key, tuple):
            epoch, i = key
            rng = self.draws(epoch, i) if self.perturbed else None
        else:
            i, rng = key, None
        try:
            feats = self.features(i, rng)
        except AudioFileError as exc:
            if not self.skip_bad:
                raise
            self.skipped += 1
            warnings.warn(f"skipping a bad utterance ({self.skipped} so far): {exc}", stacklevel=2)
            return None
        return feats, self.labels[i], self.items[i].text


class SpeechCollate:
    """A list of dataset items -> ``{"source": Batch, "target": Batch, "text": [str]}``; skipped items drop out."""

    def __init__(self, source: AudioModality, target: TextModality) -> None:
        self.source, self.target = source, target

    def __call__(self, rows: list[tuple[Tensor, Tensor, str] | None]) -> dict[str, Any]:
        rows = [r for r in rows if r is not None]
        if not rows:
            raise AudioFileError("every utterance of a batch was bad and skipped")
        return {"source": self.source.collate([r[0] for r in rows]),
                "target": self.target.collate([r[1] for r in rows]), "text": [r[2] for r in rows]}


class SpeechDataModule(L.LightningDataModule):
    """Base of the speech data modules: splits of :class:`Utterance` -> length-bucketed batches for a
    ``source`` audio modality and a ``target`` text modality (whose vocabulary is built from the training
    transcripts unless it came from a checkpoint). Subclasses say where the splits come from (:meth:`splits`)."""

    gap: float = 0.0

    def __init__(self, source: AudioModality, target: TextModality, data_dir: str | None = None,
                 max_batch_seconds: float = 200.0, max_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 1337, skip_bad: bool = False, cache_features: bool = True,
                 speed_perturb: list[float] | None = None, augment: WaveAugment | None = None) -> None:
        super().__init__()
        if augment is not None:
            augment.check(source.spec.sample_rate)
        self.speed_perturb, self.augment = speed_perturb, augment
        self.source, self.target = source, target
        self.data_dir = data_dir
        self.max_batch_seconds, self.max_batch_size = max_batch_seconds, max_batch_size
        self.num_workers, self.seed, self.skip_bad, self.cache_features = num_workers, seed, skip_bad, cache_features
        self._splits: dict[str, list[Utterance]] | None = None
        self._datasets: dict[str, UtteranceDataset] = {}
        self.problems: list[str] = []
        self.ctc_infeasible: dict[str, list[str]] = {}

    def splits(self) -> dict[str, list[Utterance]]:
        """``{"train": [...], "val": [...], "test": [...]}``; a split may be missing."""
        raise NotImplementedError

    def _all_splits(self) -> dict[str, list[Utterance]]:
        if self._splits is None:
            self._splits = self.splits()
            if self.problems:
                warnings.warn(f"skipped {len(self.problems)} bad manifest line(s); first: {self.problems[0]}",
                              stacklevel=2)
        return self._splits

    @property
    def modalities(self) -> dict[str, Modality]:
        if not self.target.fitted:
            train = self._all_splits().get("train") or []
            if not train:
                raise DataFileError("no training utterances to build the transcript vocabulary from")
            self.target.fit(u.text for u in train)
        return {"source": self.source, "target": self.target}

    def training_words(self) -> list[str]:
        """The distinct words of the training transcripts, sorted (a recogniser's ``lexicon: train``)."""
        train = self._all_splits().get("train") or []
        if not train:
            raise DataFileError("no training transcripts to collect a lexicon from")
        return sorted({w for u in train for w in u.text.split()})

    def _check(self, name: str, items: list[Utterance]) -> tuple[list[Utterance], list[Tensor]]:
        """Transcripts must fit the vocabulary; utterances too short for CTC are counted and reported."""
        kept, labels, bad = [], [], []
        for u in items:
            try:
                ids = self.target.encode(u.text)
            except VocabularyError as exc:
                if not self.skip_bad:
                    raise VocabularyError(f"{u.where or name}: transcript {u.text[:60]!r}: {exc}") from None
                bad.append(f"{u.where}: {exc}")
                continue
            if self.source.tokens_for(u.duration) < min_ctc_frames(ids):
                self.ctc_infeasible.setdefault(name, []).append(u.where or u.audio[0])
            kept.append(u)
            labels.append(ids)
        if bad:
            warnings.warn(f"{name}: skipped {len(bad)} utterance(s) whose transcript does not fit the vocabulary; "
                          f"first: {bad[0]}", stacklevel=2)
        short = self.ctc_infeasible.get(name, [])
        if short:
            warnings.warn(f"{name}: {len(short)} of {len(items)} utterance(s) are too short for their transcript "
                          f"under CTC (frames after x{self.source.spec.subsampling} subsampling < labels + repeats); "
                          f"their CTC loss is left out (the attention loss still trains on them). First: "
                          f"{', '.join(short[:5])}. A shorter hop or less subsampling makes them fit.", stacklevel=2)
        return kept, labels

    def setup(self, stage: str) -> None:
        splits = self._all_splits()
        self.modalities  # noqa: B018  (builds the vocabulary if needed)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}.get(stage, ())
        for name in wanted:
            if name in self._datasets:
                continue
            items, labels = self._check(name, splits.get(name) or [])
            if not items:
                raise DataFileError(f"the {name} split is empty{' after skipping bad utterances' if splits.get(name) else ''}; "
                                    f"give it utterances")
            self._datasets[name] = UtteranceDataset(items, self.source, self.target, self.gap,
                                                    self.cache_features, self.skip_bad,
                                                    self.speed_perturb if name == "train" else None, self.seed,
                                                    labels, self.augment if name == "train" else None)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        ds = self._datasets[name]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        # Lightning would wrap a DistributedSampler around these batches, which it cannot do for a batch sampler
        # (a TypeError that names neither the fix nor this class). Its flag has no public reader.
        injecting = getattr(getattr(self.trainer, "_accelerator_connector", None), "use_distributed_sampler", False)
        if world > 1 and injecting:
            raise ValueError(f"{type(self).__name__} batches utterances by duration and gives each of the {world} "
                             "ranks its own batches, so Lightning must not add a DistributedSampler: set "
                             "use_distributed_sampler=False on the Trainer (--trainer.use_distributed_sampler false; "
                             "the speech recipes set it)")
        sampler = DurationBatchSampler([u.duration for u in ds.items], self.max_batch_seconds, shuffle=shuffle,
                                       seed=self.seed, max_batch_size=self.max_batch_size, rank=rank, world=world,
                                       keyed=shuffle)
        # A DataLoader draws its workers' base seed from `generator` whenever it builds an iterator (with or without
        # workers): from the global generator by default, which would shift the model's dropout and SpecAugment draws
        # at every epoch, and differently in a run resumed mid-epoch. Nothing fetched draws from the workers' seeds.
        return (ResumableLoader if shuffle else DataLoader)(
            ds, batch_sampler=sampler, collate_fn=SpeechCollate(self.source, self.target),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # Lightning saves a data module's state_dict in every checkpoint and restores it before training resumes. The
    # training loader's position is saved by Lightning itself (ResumableLoader); what is kept here is the global
    # random state, which the model's dropout, SpecAugment and frequency warp draw from and which Lightning does
    # not checkpoint: a resumed run then continues their draws where the checkpoint was written.
    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fitting = self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING
        if "rng" in state and fitting:  # (evaluating a checkpoint leaves the random state alone)
            set_rng_state(state["rng"])


class ManifestDataModule(SpeechDataModule):
    """A user's recordings, listed in JSONL manifests (see the module docstring for the format).

    Args:
        source: the audio modality (e.g. ``LogMelFrames``).
        target: the text modality (e.g. ``CharTokenizer``).
        train_manifest: training utterances (relative to ``data_dir``).
        val_manifest: validation utterances.
        test_manifest: test utterances, read once, by ``mmgen test``.
        data_dir: root for relative manifest paths; default ``$MMGEN_DATA_DIR``.
        max_batch_seconds: padded audio per batch, in seconds.
        max_batch_size: most utterances per batch.
        num_workers: data-loader worker processes.
        seed: seed of the batch order.
        skip_bad: skip unreadable files, malformed lines and transcripts outside the vocabulary with a warning and a
            count, instead of stopping at the first.
        cache_features: keep features in memory after their first computation (of the training split only without
            ``speed_perturb`` and ``augment``, whose features change at every fetch; its waveforms are kept instead).
        speed_perturb: training speeds to draw from, e.g. ``[0.9, 1.0, 1.1]`` (speed perturbation); none by default.
        augment: training waveform augmentation after speed perturbation (:class:`~mmgen.data.augment.WaveAugment`:
            noise, reverberation, band-limiting, gain); none by default. Validation and test are never augmented.
    """

    def __init__(self, source: AudioModality, target: TextModality, train_manifest: str | None = None,
                 val_manifest: str | None = None, test_manifest: str | None = None, data_dir: str | None = None,
                 max_batch_seconds: float = 200.0, max_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 1337, skip_bad: bool = False, cache_features: bool = True,
                 speed_perturb: list[float] | None = None, augment: WaveAugment | None = None) -> None:
        super().__init__(source, target, data_dir, max_batch_seconds, max_batch_size, num_workers, seed, skip_bad,
                         cache_features, speed_perturb, augment)
        self.train_manifest, self.val_manifest, self.test_manifest = train_manifest, val_manifest, test_manifest

    def splits(self) -> dict[str, list[Utterance]]:
        out = {}
        for name, path in (("train", self.train_manifest), ("val", self.val_manifest), ("test", self.test_manifest)):
            if path:
                items, problems = read_manifest(resolve(path, self.data_dir), skip_bad=self.skip_bad)
                out[name] = items
                self.problems.extend(problems)
        return out


class FSDDDataModule(SpeechDataModule):
    """The Free Spoken Digit Dataset (recordings ``DIGIT_SPEAKER_INDEX.wav``, 8 kHz), transcribed as digit words.

    Args:
        source: the audio modality (e.g. ``LogMelFrames``).
        target: the text modality (e.g. ``CharTokenizer``).
        path: the recordings folder, relative to ``data_dir``.
        split: ``standard`` (index 0-4 of each digit and speaker is test, 5-9 validation, the rest training) or
            ``speaker`` (``test_speaker`` is held out whole for test; validation is index 5-9 of the others).
        test_speaker: the held-out speaker of the ``speaker`` split.
        connected: train and test on connected digits: sequences of several recordings of one speaker joined by
            ``gap_ms`` of silence, drawn from each split's recordings with a fixed seed.
        connected_lengths: shortest and longest sequence, in digits.
        connected_counts: sequences for training, validation and test.
        gap_ms: the silence between the digits of a sequence.
        connected_seed: seed of the sequences (fixed, whatever the run's seed).
        speakers: use only these speakers' recordings (default: every speaker in the folder; the benchmarks use
            george, jackson, lucas, nicolas and theo, which the downloaded v1.0.10 archive joins with yweweler).
        data_dir: root for ``path``; default ``$MMGEN_DATA_DIR``.
        max_batch_seconds: padded audio per batch, in seconds.
        max_batch_size: most utterances per batch.
        num_workers: data-loader worker processes.
        seed: seed of the batch order.
        skip_bad: skip unreadable files with a warning and a count.
        cache_features: keep features in memory after their first computation (of the training split only without
            ``speed_perturb`` and ``augment``, whose features change at every fetch; its waveforms are kept instead).
        speed_perturb: training speeds to draw from, e.g. ``[0.9, 1.0, 1.1]`` (speed perturbation); none by default.
        augment: training waveform augmentation after speed perturbation (:class:`~mmgen.data.augment.WaveAugment`:
            noise, reverberation, band-limiting, gain); none by default. Validation and test are never augmented.
    """

    def __init__(self, source: AudioModality, target: TextModality, path: str = "fsdd/recordings",
                 split: Literal["standard", "speaker"] = "standard", test_speaker: str = "theo",
                 connected: bool = False, connected_lengths: tuple[int, int] = (2, 7),
                 connected_counts: tuple[int, int, int] = (6000, 300, 1000), gap_ms: float = 100.0,
                 connected_seed: int = 0, speakers: list[str] | None = None, data_dir: str | None = None,
                 max_batch_seconds: float = 200.0,
                 max_batch_size: int | None = None, num_workers: int = 0, seed: int = 1337, skip_bad: bool = False,
                 cache_features: bool = True, speed_perturb: list[float] | None = None,
                 augment: WaveAugment | None = None) -> None:
        super().__init__(source, target, data_dir, max_batch_seconds, max_batch_size, num_workers, seed, skip_bad,
                         cache_features, speed_perturb, augment)
        if split not in ("standard", "speaker"):
            raise ValueError(f"split={split!r}; accepted: 'standard' or 'speaker'")
        self.path, self.split, self.test_speaker = path, split, test_speaker
        self.connected, self.connected_lengths = connected, tuple(connected_lengths)
        self.connected_counts, self.gap_ms, self.connected_seed = tuple(connected_counts), gap_ms, connected_seed
        self.gap = gap_ms / 1000.0 if connected else 0.0
        self.speakers = speakers

    def splits(self) -> dict[str, list[Utterance]]:
        folder = resolve(self.path, self.data_dir)
        items = fsdd_utterances(folder)
        if self.speakers:
            present = sorted({u.speaker for u in items})
            missing = sorted(set(self.speakers) - set(present))
            if missing:
                raise ValueError(f"speakers {missing} are not in {folder}; accepted: {', '.join(present)}")
            items = [u for u in items if u.speaker in self.speakers]
        out = fsdd_splits(items, self.split, self.test_speaker)
        if self.connected:
            out = {name: connected_digits(out[name], count, self.connected_lengths, self.gap,
                                          self.connected_seed * 3 + k)
                   for k, (name, count) in enumerate(zip(("train", "val", "test"), self.connected_counts))}
        return out
