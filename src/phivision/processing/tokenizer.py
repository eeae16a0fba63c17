"""The Phi-3 tokenizer, read straight from a local `tokenizer.json`.

The `tokenizers` file is used as written in the checkpoint (normaliser, byte fallback, added
tokens), never rebuilt from a Python class, so ids match the official tokenizer exactly. As in
transformers 5.x, the `added_tokens_decoder` of `tokenizer_config.json` wins over tokenizer.json
for an added token's flags (lstrip, rstrip, normalized, single_word, special); flags given in
`special_tokens_map.json` or for named special tokens do not change a token tokenizer.json has.
BOS is added by the processor, never by the tokenizer.

Data text is tokenised as text (`encode_chat`): `<|end|>` written in a question is the five
characters, not the control token; only the chat template places control tokens (`control`).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

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
# Marks a control token the chat template placed; a Unicode noncharacter, reserved for internal use.
CONTROL_MARK = "\ufdd0"
ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


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
        self._chat: tuple[Tokenizer, dict[int, int]] | None = None

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
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:
            raise PhivisionError(f"{path} cannot be read as a tokenizers file: {error}") from None
        apply_added_token_flags(tokenizer, folder / "tokenizer_config.json")
        return cls(tokenizer, source=folder)

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

    def control(self, token: str) -> str:
        """`token` (e.g. `<|end|>`) as the chat template writes it for `encode_chat`."""
        return CONTROL_MARK + token

    def encode_chat(self, text: str) -> list[int]:
        """Text where only `control(...)` marks are control tokens: anything written literally is text.

        The marked tokens keep their flags, so a template encodes to exactly the ids of `encode`
        on the unmarked string whenever the data text holds no control-token strings.
        """
        if self._chat is None:
            self._chat = _marked_tokenizer(self.tokenizer)
        marked, real_id = self._chat
        return [real_id.get(token_id, token_id) for token_id in marked.encode(text, add_special_tokens=False).ids]

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


def _marked_tokenizer(tokenizer: Tokenizer) -> tuple[Tokenizer, dict[int, int]]:
    """A copy whose added tokens match only behind CONTROL_MARK, with the same flags; marked id -> real id."""
    spec = json.loads(tokenizer.to_str())
    for token in spec["added_tokens"]:
        token["content"] = CONTROL_MARK + token["content"]
    marked = Tokenizer.from_str(json.dumps(spec))
    return marked, {marked.token_to_id(token["content"]): token["id"] for token in spec["added_tokens"]}


def apply_added_token_flags(tokenizer: Tokenizer, config_path: Path) -> None:
    """The flags `added_tokens_decoder` of tokenizer_config.json gives, as transformers 5.x applies them."""
    if not config_path.is_file():
        return
    try:
        entries = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    except (ValueError, AttributeError) as error:
        raise PhivisionError(f"{config_path} is not a JSON object: {error}") from None
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise PhivisionError(f"{config_path}: added_tokens_decoder[{key!r}] needs a \"content\" string")
        flags = {name: bool(entry[name]) for name in ADDED_TOKEN_FLAGS if name in entry}
        token = AddedToken(entry["content"], **flags)
        (tokenizer.add_special_tokens if flags.get("special") else tokenizer.add_tokens)([token])
        if str(tokenizer.token_to_id(entry["content"])) != str(key):
            raise PhivisionError(
                f"{config_path}: added_tokens_decoder gives {entry['content']!r} the id {key}, but tokenizer.json "
                f"has it as {tokenizer.token_to_id(entry['content'])}; use the checkpoint's own tokenizer files"
            )
