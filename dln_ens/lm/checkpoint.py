"""What a local Hugging Face checkpoint directory must hold, checked without importing torch
(configs are validated before anything heavy loads; nothing is ever downloaded)."""
from __future__ import annotations

from pathlib import Path

from dln_ens.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")


class MissingModelError(UserError, FileNotFoundError):
    pass


def check_model_dir(path: str | Path) -> Path:
    """Fail early, naming the path and the missing piece, instead of letting transformers try the Hub."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingModelError(f"model directory {path} does not exist (give the path of a local "
                                f"checkpoint saved with save_pretrained; nothing is downloaded)")
    if not path.is_dir():
        raise MissingModelError(f"model path {path} is a file; give the checkpoint's directory")
    if not (path / "config.json").is_file():
        raise MissingModelError(f"model directory {path} has no config.json: it is not a transformers "
                                f"checkpoint (save it with model.save_pretrained({str(path)!r}))")
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if not has_weights:
        raise MissingModelError(f"model directory {path} has no weights (expected one of "
                                f"{', '.join(WEIGHT_FILES)}); save them with model.save_pretrained({str(path)!r})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise MissingModelError(f"model directory {path} has no tokenizer (expected one of "
                                f"{', '.join(TOKENIZER_FILES)}); save it with tokenizer.save_pretrained({str(path)!r})")
    return path
