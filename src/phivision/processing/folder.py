"""A model folder = weights + config + processor files, laid out like the official checkpoint.

Every folder phivision writes carries what its base folder carries, so it loads wherever the base
loads (the official remote code, vLLM): the base's remote-code files, copied byte for byte and
never imported, for the `auto_map` entries of config.json and preprocessor_config.json; the
tokenizer files with the chat template; and a generation_config.json that stops at `<|end|>`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers

from phivision.errors import PhivisionError
from phivision.model.config import Phi3VConfig
from phivision.model.modeling import Phi3VForCausalLM
from phivision.model.tiny import random_model
from phivision.model.weights import has_weights, save_model
from phivision.processing.processor import PREPROCESSOR_FILE, Phi3VProcessor
from phivision.processing.tokenizer import Phi3Tokenizer

# The official checkpoint's own code: `trust_remote_code` loaders (vLLM's processor among them)
# import these through `auto_map`.
REMOTE_CODE_FILES = ("configuration_phi3_v.py", "modeling_phi3_v.py", "processing_phi3_v.py",
                     "image_processing_phi3_v.py")
# A fine-tuned model is a derivative of the base: its licence travels with it.
LICENSE_FILES = ("LICENSE", "NOTICE.md")
AUTO_MAP_FILES = ("config.json", PREPROCESSOR_FILE)
GENERATION_CONFIG_FILE = "generation_config.json"


def save_model_folder(
    model: Phi3VForCausalLM,
    processor: Phi3VProcessor,
    folder: str | Path,
    precision: str | torch.dtype | None = None,
    base: str | Path | None = None,
) -> None:
    """Weights and config in the official layout, then everything else the base folder carries."""
    save_model(model, folder, precision)
    complete_model_folder(folder, processor, base)


def complete_model_folder(folder: str | Path, processor: Phi3VProcessor, base: str | Path | None) -> None:
    """Processor, tokenizer, remote code, licence and generation config beside weights already written.

    `base` is the folder the model was loaded from (None for random weights); the result's
    `auto_map` entries only name files that are in `folder`.
    """
    folder = Path(folder)
    if base is not None and Path(base).resolve() != folder.resolve():
        for name in REMOTE_CODE_FILES + LICENSE_FILES:
            if (Path(base) / name).is_file():
                shutil.copyfile(Path(base) / name, folder / name)
    processor.save_pretrained(folder)
    for name in AUTO_MAP_FILES:
        drop_unresolved_auto_map(folder / name)
    write_generation_config(folder, processor.tokenizer, base)


def auto_map_resolves(folder: Path, reference: str | list | None) -> bool:
    """`module.Class` (or a [slow, fast] pair) resolves when every named module.py is in `folder`."""
    references = [reference] if isinstance(reference, str) else [r for r in reference or [] if r]
    return all((folder / (r.split("--")[-1].rsplit(".", 1)[0] + ".py")).is_file() for r in references)


def drop_unresolved_auto_map(path: Path) -> None:
    """Remove `auto_map` entries whose code file is missing: the official loader fails on them."""
    if not path.is_file():
        return
    values = json.loads(path.read_text())
    auto_map = values.get("auto_map")
    if not isinstance(auto_map, dict):
        return
    kept = {key: reference for key, reference in auto_map.items() if auto_map_resolves(path.parent, reference)}
    if kept == auto_map:
        return
    if kept:
        values["auto_map"] = kept
    else:
        del values["auto_map"]
    path.write_text(json.dumps(values, indent=2) + "\n")


def write_generation_config(folder: Path, tokenizer: Phi3Tokenizer, base: str | Path | None) -> None:
    """The base's generation config, stopping at `<|end|>` or `<|endoftext|>`.

    The published file stops at `</s>` only, which a fine-tuned model never writes: other tools
    then generate past the answer. `_from_model_config` goes, since the file no longer copies
    config.json (whose `eos_token_id` stays 2, as published).
    """
    values: dict = {"bos_token_id": tokenizer.bos_id}
    if base is not None and (Path(base) / GENERATION_CONFIG_FILE).is_file():
        values = json.loads((Path(base) / GENERATION_CONFIG_FILE).read_text())
    values.pop("_from_model_config", None)
    values.update(eos_token_id=tokenizer.stop_ids, pad_token_id=tokenizer.pad_id,
                  transformers_version=transformers.__version__)
    (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(values, indent=2) + "\n")


def processor_for(config: Phi3VConfig, tokenizer: Phi3Tokenizer, num_crops: int) -> Phi3VProcessor:
    """A processor whose crop geometry matches the model's vision tower."""
    return Phi3VProcessor(tokenizer, num_crops=num_crops, crop_size=config.crop_size, merged_grid=config.merged_grid)


def write_random_model(folder: str | Path, preset: str = "tiny", num_crops: int = 4, seed: int = 0,
                       overwrite: bool = False) -> Path:
    """A complete random-weight folder with the real Phi-3 vocabulary; existing weights only with `overwrite`."""
    existing = has_weights(folder)
    if existing and not overwrite:
        raise PhivisionError(f"{folder} already holds weights ({', '.join(existing)}): choose another folder, "
                             "or pass --overwrite to replace them")
    model = random_model(preset, seed=seed)
    save_model_folder(model, processor_for(model.config, Phi3Tokenizer.bundled(), num_crops), folder)
    return Path(folder)
