"""A model folder = weights + config + processor files, laid out like the official checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from phivision.errors import PhivisionError
from phivision.model.config import Phi3VConfig
from phivision.model.modeling import Phi3VForCausalLM
from phivision.model.tiny import random_model
from phivision.model.weights import has_weights, save_model
from phivision.processing.processor import Phi3VProcessor
from phivision.processing.tokenizer import Phi3Tokenizer


def save_model_folder(
    model: Phi3VForCausalLM,
    processor: Phi3VProcessor,
    folder: str | Path,
    precision: str | torch.dtype | None = None,
) -> None:
    save_model(model, folder, precision)
    processor.save_pretrained(folder)


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
