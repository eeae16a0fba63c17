"""The Phi-3 tokenizer, read straight from a local `tokenizer.json`.

The `tokenizers` file is used as written in the checkpoint (normaliser, byte fallback, added
tokens), never rebuilt from a Python class, so ids match the official tokenizer exactly. BOS is
added by the processor, never by the tokenizer.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

from phivision.errors import PhivisionError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")

# tokenizer_config.json for folders phivision writes (tiny models): the official special tokens.
DEFAULT_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<unk>",
    "model_max_length": 131072,
    "padding_side": "right",
    "legacy": False,
    "tokenizer_class": "LlamaTokenizer",
    "clean_up_tokenization_spaces": False,
    "chat_template": (
        "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{- '<|assistant|>\n' -}}{% endif %}"
    ),
}


def _special_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


# special_tokens_map.json as the official checkpoint publishes it.
DEFAULT_SPECIAL_TOKENS_MAP = {
    "bos_token": _special_token("<s>"),
    "eos_token": _special_token("<|endoftext|>"),
    "pad_token": _special_token("<|endoftext|>"),
    "unk_token": _special_token("<unk>"),
}


def bundled_tokenizer_path() -> Path:
    """The real Phi-3 vocabulary shipped with phivision (see assets/phi3-tokenizer/README.md)."""
    return Path(str(resources.files("phivision") / "assets" / "phi3-tokenizer" / "tokenizer.json"))


class Phi3Tokenizer:
    """A checkpoint's `tokenizer.json` with the Phi-3 special-token ids; adds no BOS of its own."""

    def __init__(self, tokenizer: Tokenizer, source: Path | None = None):
        self.tokenizer = tokenizer
        self.source = source
        self.bos_id = self._required_id("<s>")
        self.pad_id = self._required_id("<|endoftext|>")
        self.endoftext_id = self.pad_id
        self.end_id = self._required_id("<|end|>")
        self.user_id = self._required_id("<|user|>")
        self.assistant_id = self._required_id("<|assistant|>")

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Phi3Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            hint = " (it has tokenizer.model only: phivision reads tokenizer.json)" if (
                folder / "tokenizer.model"
            ).is_file() else ""
            raise PhivisionError(f"{folder} has no tokenizer.json{hint}")
        try:
            return cls(Tokenizer.from_file(str(path)), source=folder)
        except Exception as error:
            raise PhivisionError(f"{path} cannot be read as a tokenizers file: {error}") from None

    @classmethod
    def bundled(cls) -> "Phi3Tokenizer":
        path = bundled_tokenizer_path()
        return cls(Tokenizer.from_file(str(path)), source=path.parent)

    def _required_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise PhivisionError(f"the tokenizer has no {token} token: is it a Phi-3 tokenizer?")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if int(i) >= 0]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def stop_ids(self) -> list[int]:
        """Generation ends at `<|end|>` or `<|endoftext|>`."""
        return [self.end_id, self.endoftext_id]

    def save(self, folder: str | Path) -> None:
        """Copy the tokenizer files unchanged; write the official configs where the source had none."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        source = self.source
        if source is not None and source.resolve() != folder.resolve():
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, folder / name)
        if not (folder / "tokenizer.json").is_file():
            self.tokenizer.save(str(folder / "tokenizer.json"))
        if not (folder / "tokenizer_config.json").is_file():
            (folder / "tokenizer_config.json").write_text(json.dumps(DEFAULT_TOKENIZER_CONFIG, indent=2) + "\n")
        if not (folder / "special_tokens_map.json").is_file():
            (folder / "special_tokens_map.json").write_text(json.dumps(DEFAULT_SPECIAL_TOKENS_MAP, indent=2) + "\n")
