"""Run a package on the device: load once, pick the adapter per call. Imports onnxruntime, numpy and tokenizers;
never torch, transformers or onnx."""

from .decoder import DecoderModel, GenerationResult
from .encoder import EncoderModel
from .session import PackageModel, load

__all__ = ["DecoderModel", "EncoderModel", "GenerationResult", "PackageModel", "load"]
