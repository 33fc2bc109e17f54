"""edgetune: federated fine-tuning and compression of LLMs for edge devices."""

__version__ = "0.1.0"
