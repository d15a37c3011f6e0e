"""Lightning data modules and data-set locations."""

from mmgen.data.paths import DataFileError, data_dir, resolve
from mmgen.data.text import RandomWindows, TextDataModule, read_corpus

__all__ = ["DataFileError", "RandomWindows", "TextDataModule", "data_dir", "read_corpus", "resolve"]
