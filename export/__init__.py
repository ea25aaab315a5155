"""Export: the trained student -> ONNX files with their preprocessing contract, parity-checked (SPEC §8).

Importing this package is cheap; torch, timm and onnx load when ``export_onnx`` runs.
"""
from .onnx import ExportGateError, export_onnx

__all__ = ["export_onnx", "ExportGateError"]
