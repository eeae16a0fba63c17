"""The Phi-3-V model: config, modeling on transformers' Phi-3 and CLIP parts, strict safetensors load/save."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phivision._lazy import lazy_exports

if TYPE_CHECKING:
    from phivision.model.config import Phi3VConfig
    from phivision.model.modeling import Phi3VForCausalLM, Phi3VModel, IGNORE_INDEX
    from phivision.model.vision import num_image_tokens
    from phivision.model.weights import load_model, save_model, resolve_dtype
    from phivision.model.tiny import PRESETS, preset_config, random_model

# public name -> the module that defines it
_EXPORTS = {
    "Phi3VConfig": "phivision.model.config",
    "Phi3VForCausalLM": "phivision.model.modeling",
    "Phi3VModel": "phivision.model.modeling",
    "IGNORE_INDEX": "phivision.model.modeling",
    "num_image_tokens": "phivision.model.vision",
    "load_model": "phivision.model.weights",
    "save_model": "phivision.model.weights",
    "resolve_dtype": "phivision.model.weights",
    "PRESETS": "phivision.model.tiny",
    "preset_config": "phivision.model.tiny",
    "random_model": "phivision.model.tiny",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
