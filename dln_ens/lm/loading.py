"""Checks and options for loading a local Hugging Face checkpoint (nothing is ever downloaded)."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype):
    """"auto" keeps the checkpoint's own dtype (transformers' meaning); other names are explicit."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[dtype]
