"""The slim serving runtime: loads an artifact and serves it without the model's source.

Imports only jax, numpy and safetensors, never flax, tensorflow, orbax, dp_attention or export.
"""
