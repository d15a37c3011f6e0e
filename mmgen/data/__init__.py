"""Lightning data modules and data-set locations."""

from mmgen.data.augment import WaveAugment
from mmgen.data.paths import DataFileError, data_dir, resolve
from mmgen.data.speech import (DurationBatchSampler, FSDDDataModule, ManifestDataModule, ManifestError,
                               SpeechDataModule, Utterance, read_manifest)
from mmgen.data.text import RandomWindows, TextDataModule, read_corpus

__all__ = ["DataFileError", "DurationBatchSampler", "FSDDDataModule", "ManifestDataModule", "ManifestError",
           "RandomWindows", "SpeechDataModule", "TextDataModule", "Utterance", "WaveAugment", "data_dir",
           "read_corpus", "read_manifest", "resolve"]
