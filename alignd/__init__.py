"""alignd: an inference server for aligned decoding (Transfer Q*) over vLLM."""

__version__ = "0.1.0"
