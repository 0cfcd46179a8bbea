"""What a local Hugging Face checkpoint directory must hold, checked without importing torch
(configs are validated before anything heavy loads; nothing is ever downloaded)."""
from __future__ import annotations

from pathlib import Path

from dln_ens.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")


PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class MissingModelError(UserError, FileNotFoundError):
    pass


class UnsafeCheckpointError(UserError, ValueError):
    """Only pickle weights (which can run code when unpickled) and pickle was not allowed."""


class BrokenCheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read (truncated download, disk full...)."""


def check_model_dir(path: str | Path, allow_pickle: bool = False) -> Path:
    """Fail early, naming the path and the missing piece, instead of letting transformers try the
    Hub. Weights must be safetensors unless ``allow_pickle``."""
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
    if not allow_pickle and not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        raise UnsafeCheckpointError(
            f"model directory {path} holds only pickle weights ({', '.join(f for f in PICKLE_FILES if (path / f).is_file())}), "
            f"which can run code when loaded; convert them with model.save_pretrained({str(path)!r}) "
            f"(safetensors), or set \"allow_pickle\": true on the backend if you trust the file")
    return path


def unreadable_checkpoint(path: Path, error: Exception) -> Exception:
    """The error to raise when transformers fails to load ``path``: a `BrokenCheckpointError`
    naming the weight file when one of them cannot be read (truncated, not safetensors), else
    ``error`` itself (a genuine bug or an unsupported architecture keeps its traceback)."""
    from safetensors import safe_open
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    st.get_slice(key)
        except Exception as e:  # noqa: BLE001 - any failure to read means: damaged file
            return BrokenCheckpointError(
                f"{f}: cannot be read ({str(e).splitlines()[0][:120]}); the file is damaged or incomplete "
                f"(an interrupted copy or download?): copy or save the checkpoint again "
                f"(model.save_pretrained({str(path)!r}))")
    return error
