"""megalite: a compact, readable Megatron-style 3D-parallel GPT pretraining library."""
__version__ = "0.1.0"
