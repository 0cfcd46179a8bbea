"""`HFLanguageModel`'s tokenisation rules over a tokenizer alone (no model): what a client of a
served model needs to split context/target pairs exactly as the in-process backend does."""
from __future__ import annotations

from pathlib import Path

from dln_ens.lm.checkpoint import MissingModelError
from dln_ens.lm.hf import HFLanguageModel


class LocalTokenizer:
    encode = HFLanguageModel.encode
    encode_many = HFLanguageModel.encode_many
    nonempty = HFLanguageModel.nonempty
    split_pairs = HFLanguageModel.split_pairs
    split_pairs_with_text = HFLanguageModel.split_pairs_with_text

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        path = Path(path).expanduser()
        if not path.is_dir():
            raise MissingModelError(f"tokenizer directory {path} does not exist (give the served model's "
                                    f"local tokenizer directory, or null)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.name = path.name
        self.eos_token_id = self.tokenizer.eos_token_id
