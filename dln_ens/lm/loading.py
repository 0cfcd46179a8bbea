"""Checks and options for loading a local Hugging Face checkpoint (nothing is ever downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str | Path) -> Path:
    """Fail early, naming the path and the missing piece, instead of letting transformers try the Hub."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist (give the path of a local "
                                f"checkpoint saved with save_pretrained; nothing is downloaded)")
    if not path.is_dir():
        raise NotADirectoryError(f"model path {path} is a file; give the checkpoint's directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json: it is not a transformers "
                                f"checkpoint (save it with model.save_pretrained({str(path)!r}))")
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if not has_weights:
        raise FileNotFoundError(f"model directory {path} has no weights (expected one of "
                                f"{', '.join(WEIGHT_FILES)}); save them with model.save_pretrained({str(path)!r})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise FileNotFoundError(f"model directory {path} has no tokenizer (expected one of "
                                f"{', '.join(TOKENIZER_FILES)}); save it with tokenizer.save_pretrained({str(path)!r})")
    return path


def resolve_dtype(dtype: str | torch.dtype):
    """"auto" keeps the checkpoint's own dtype (transformers' meaning); other names are explicit."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[dtype]
