"""The harness: regression and benchmark harness for fake quantization of language models."""

__version__ = "0.1.0"
