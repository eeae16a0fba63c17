"""Random-weight Phi-3-V configs of the real architecture, for CPUs, tests and benchmarks."""

from __future__ import annotations

import torch

from phivision.errors import PhivisionError
from phivision.model.config import OFFICIAL_CLIP, Phi3VConfig
from phivision.model.modeling import Phi3VForCausalLM

OFFICIAL_TEXT = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}

# Text and vision geometry per preset; `vision` is the CLIP tower (None = official ViT-L/14-336).
PRESETS = {
    # Trains in seconds on a CPU: 56 px crops -> 2x2 merged features per crop.
    "tiny": {
        "text": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 4},
        "vision": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
                   "num_attention_heads": 4, "image_size": 56, "patch_size": 14},
    },
    # About 57M parameters in official proportions, for benchmarks.
    "small": {
        "text": {"hidden_size": 512, "intermediate_size": 1368, "num_hidden_layers": 6,
                 "num_attention_heads": 8, "num_key_value_heads": 8},
        "vision": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6,
                   "num_attention_heads": 4, "image_size": 112, "patch_size": 14},
    },
    # The official CLIP ViT-L/14-336 tower with the small decoder: the real vision geometry (577
    # tokens per crop, 24 layers of width 1024), where CLIP is most of a step's work.
    "clip-l": {
        "text": {"hidden_size": 512, "intermediate_size": 1368, "num_hidden_layers": 6,
                 "num_attention_heads": 8, "num_key_value_heads": 8},
        "vision": None,
    },
    "official": {"text": OFFICIAL_TEXT, "vision": None},
}


def rope_factors(rotary_half: int) -> dict[str, list[float]]:
    """Distinct short and long LongRoPE factors shaped like the official ones (which are not public here).

    Short factors stay near 1, long ones grow towards the low frequencies, so a model that picks
    the wrong set, or one set for a whole mixed batch, gives visibly different logits.
    """
    steps = [index / max(rotary_half - 1, 1) for index in range(rotary_half)]
    return {
        "short_factor": [round(1.0 + 0.2 * step * step, 4) for step in steps],
        "long_factor": [round(1.0 + 31.0 * step**3, 4) for step in steps],
    }


def preset_config(preset: str) -> Phi3VConfig:
    """A config with the official token ids, rope type and vocabulary at a preset's size."""
    if preset not in PRESETS:
        raise PhivisionError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    text, vision = PRESETS[preset]["text"], PRESETS[preset]["vision"]
    rotary_half = text["hidden_size"] // text["num_attention_heads"] // 2
    img_processor = {"image_dim_out": 1024, "model_name": OFFICIAL_CLIP, "name": "clip_vision_model",
                     "num_img_tokens": 144}
    if vision is not None:
        merged = vision["image_size"] // vision["patch_size"] // 2
        img_processor = {"image_dim_out": vision["hidden_size"], "model_name": f"phivision-{preset}",
                         "name": "clip_vision_model", "num_img_tokens": merged * merged,
                         "vision_config": dict(vision)}
    return Phi3VConfig(
        **text,
        vocab_size=32064,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "su", **rope_factors(rotary_half)},
        rope_theta=10000.0,
        sliding_window=262144,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32000,
        tie_word_embeddings=False,
        embd_layer=None,
        img_processor=img_processor,
        dtype="float32",
    )


def random_model(preset: str, seed: int = 0, attn: str = "sdpa") -> Phi3VForCausalLM:
    """A randomly initialised model; separators get small random values so they carry signal."""
    config = preset_config(preset)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(config)
    init_separators(model)
    return model


def init_separators(model: Phi3VForCausalLM) -> None:
    """The image separators start at zero; small random values let them carry signal from step one."""
    embedding = model.model.vision_embed_tokens
    with torch.no_grad():
        embedding.glb_GN.normal_(std=0.02)
        embedding.sub_GN.normal_(std=0.02)
