"""Tasks: one LightningModule each, built on the shared blocks and taking modalities by role."""

from mmgen.tasks.language_model import GPT, LanguageModel

__all__ = ["GPT", "LanguageModel"]
