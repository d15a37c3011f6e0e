"""mmgen: multimodal generative modelling on PyTorch Lightning, with modality plugins and shared attention blocks."""

__version__ = "0.1.0"

from mmgen.api import load  # noqa: E402
from mmgen.modality import Modality, TextModality  # noqa: E402

__all__ = ["Modality", "TextModality", "__version__", "load"]
