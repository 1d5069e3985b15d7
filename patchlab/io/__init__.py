"""Bytes on disk <-> tensors, no math: safetensors files, checkpoints, the patch format, PEFT adapters."""
