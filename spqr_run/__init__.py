"""spqr-run: a local chat runtime for SpQR-compressed LLaMA and Falcon models."""

__version__ = "0.1.0"
