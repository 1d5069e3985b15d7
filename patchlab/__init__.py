"""patchlab: extract, apply, port, merge and measure fine-tuning patches across base-model releases."""

__version__ = "0.1.0"
