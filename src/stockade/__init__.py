"""stockade: run code strangers send, confined, fast."""

__version__ = "0.1.0"
