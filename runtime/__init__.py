"""The runtime: classify images with an exported distillery model.

Needs numpy, Pillow and onnxruntime only (the base install); never imports torch.
"""
from .classifier import Classifier, Prediction
from .preprocess import preprocess

__all__ = ["Classifier", "Prediction", "preprocess"]
