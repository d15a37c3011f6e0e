"""Tasks: one LightningModule each, built on the shared blocks and taking modalities by role."""

from mmgen.tasks.language_model import GPT, LanguageModel
from mmgen.tasks.speech_recognizer import ASRNet, SpeechRecognizer

__all__ = ["ASRNet", "GPT", "LanguageModel", "SpeechRecognizer"]
