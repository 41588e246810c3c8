"""`python -m export`: build ahead-of-time artifacts for a DP-attention Qwen3-MoE, and inspect them."""
