"""Models to benchmark: a preset's shape with random weights, or a checkpoint folder.

A preset is built on the meta device and materialised straight on the target device, so the
official 4B shape never passes through host memory and needs no download. QLoRA needs its
decoder quantised while loading, so for a preset the command first writes a random-weight folder
(`write_preset_folder`) and QLoRA loads that through the normal training loader.
"""

from __future__ import annotations

from pathlib import Path

import torch

from phivision.model.modeling import Phi3VForCausalLM
from phivision.model.tiny import init_separators, preset_config
from phivision.processing.folder import processor_for, save_model_folder
from phivision.processing.processor import Phi3VProcessor
from phivision.processing.tokenizer import Phi3Tokenizer
from phivision.train.config import TrainConfig
from phivision.train.methods import apply_method, load_for_training, weight_dtype

MAX_CROPS = 16  # the processor's default budget; each workload shape sets its own


def random_weights(preset: str, device: torch.device, attn: str = "sdpa", seed: int = 0) -> Phi3VForCausalLM:
    """The preset's architecture, meta-initialised, then materialised and randomly initialised on `device`."""
    config = preset_config(preset)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.initialize_weights()
    clip = model.model.vision_embed_tokens.img_processor.vision_model
    clip.apply(clip._init_weights)  # CLIP's own scheme, as a normally built model gets
    init_separators(model)
    return model


def write_preset_folder(preset: str, folder: str | Path, device: torch.device, seed: int = 0) -> Path:
    """A random-weight checkpoint folder of the preset, in bf16 on a GPU (half the disk), else fp32."""
    model = random_weights(preset, device, seed=seed)
    precision = torch.bfloat16 if device.type == "cuda" else torch.float32
    processor = processor_for(model.config, Phi3Tokenizer.bundled(), MAX_CROPS)
    save_model_folder(model, processor, folder, precision)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Path(folder)


def bench_processor(preset: str | None, model_dir: str | None) -> Phi3VProcessor:
    """A processor with the model's crop geometry and the bundled Phi-3 vocabulary."""
    if model_dir:
        return Phi3VProcessor.from_pretrained(model_dir, num_crops=MAX_CROPS)
    return processor_for(preset_config(preset), Phi3Tokenizer.bundled(), MAX_CROPS)


def build_model(preset: str | None, model_dir: str | None, config: TrainConfig, device: torch.device,
                seed: int = 0, fp32_weights: bool = False) -> torch.nn.Module:
    """The model as training gets it for `config.method`; `fp32_weights` lifts every float weight to fp32."""
    if model_dir:
        torch.manual_seed(seed)
        model = load_for_training(config, device_map="cuda" if device.type == "cuda" else None)
    else:
        model = random_weights(preset, device, config.attn, seed).to(weight_dtype(config))
        torch.manual_seed(seed)  # adapters start the same on every data path
        model = apply_method(model, config)
    if config.resolved_gradient_checkpointing:  # as the Trainer turns it on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if fp32_weights:
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.float()
    return model
