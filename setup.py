"""Package metadata for megalite: a compact Megatron-style 3D-parallel GPT pretraining library."""
from setuptools import find_packages, setup

setup(
    name="megalite",
    version="0.1.0",
    description="Compact, readable Megatron-style 3D-parallel GPT pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megalite", "megalite.*"]),
    install_requires=["torch", "numpy"],
    extras_require={
        # megatron-core: the parity reference of the megatron-core tests (binary wheels for CPython
        # 3.10-3.13 whose only compiled part is a dataset helper; needs just torch, numpy and
        # packaging, no CUDA packages). Pinned: the tests use its internals (RankGenerator, the
        # CPU shims in tests/megatron_shims.py); bump it deliberately.
        "test": ["pytest", "pytest-timeout", "tokenizers", "sentencepiece", "matplotlib",
                 "tensorboard", "safetensors", "transformers", "regex", "megatron-core==0.16.1"],
        "data": ["tokenizers", "sentencepiece"],
        "plot": ["matplotlib"],
        "gpu": ["flash-attn", "transformer-engine"],
        "wandb": ["wandb"],
    },
)
