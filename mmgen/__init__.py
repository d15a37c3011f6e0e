"""mmgen: multimodal generative modelling on PyTorch Lightning, with modality plugins and shared attention blocks."""

from mmgen.api import load
from mmgen.modality import Modality, TextModality

__version__ = "0.1.0"
__all__ = ["Modality", "TextModality", "__version__", "load"]
