"""Phi-3-V configuration: reads and writes the official `config.json` unchanged.

The official file uses the legacy `rope_scaling: {"type": "su", ...}` form and two free-form
dicts (`embd_layer`, `img_processor`). Internally the text side is a plain `Phi3Config` (so
`transformers`' Phi-3 blocks run as they are) and the vision side a `CLIPVisionConfig`; on save
the official spelling is restored so the folder still loads with the official remote code.
"""

from __future__ import annotations

import copy
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config

OFFICIAL_CLIP = "openai/clip-vit-large-patch14-336"

# CLIP ViT-L/14 at 336 px: the tower the official checkpoint was trained with.
OFFICIAL_CLIP_GEOMETRY = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}


@strict
class Phi3VConfig(Phi3Config):
    """The official `config.json`: a Phi-3 text config plus the image embedding's `embd_layer` / `img_processor`."""

    model_type = "phi3_v"

    embd_layer: dict | None = None
    img_processor: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.embd_layer is None:
            self.embd_layer = dict(DEFAULT_EMBD_LAYER)
        if self.img_processor is None:
            self.img_processor = {
                "image_dim_out": 1024,
                "model_name": OFFICIAL_CLIP,
                "name": "clip_vision_model",
                "num_img_tokens": 144,
            }
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, default_theta: float = 10_000.0, ignore_keys=None, **kwargs):
        """Accept the official `{"type": "su"}` spelling: it is `longrope` under a legacy name."""
        rope_scaling = kwargs.get("rope_scaling")
        if isinstance(rope_scaling, dict):
            rope_scaling = dict(rope_scaling)
            legacy_type = rope_scaling.pop("type", None)
            rope_scaling.setdefault("rope_type", legacy_type or "default")
            if rope_scaling["rope_type"] in ("su", "yarn"):
                rope_scaling["rope_type"] = "longrope"
            if rope_scaling["rope_type"] == "longrope" and "factor" not in rope_scaling:
                original = kwargs.get("original_max_position_embeddings", self.original_max_position_embeddings)
                rope_scaling["factor"] = self.max_position_embeddings / original
            kwargs["rope_scaling"] = rope_scaling
        return super().convert_rope_params_to_dict(default_theta=default_theta, ignore_keys=ignore_keys, **kwargs)

    # ---- derived geometry -------------------------------------------------------------------

    def vision_config(self) -> CLIPVisionConfig:
        """The CLIP tower's config: official ViT-L/14-336, or the explicit geometry of a tiny model."""
        geometry = dict(OFFICIAL_CLIP_GEOMETRY)
        geometry.update(self.img_processor.get("vision_config", {}))
        config = CLIPVisionConfig(**geometry)
        config._attn_implementation = self._attn_implementation or "sdpa"
        return config

    @property
    def crop_size(self) -> int:
        return int(self.vision_config().image_size)

    @property
    def patch_grid(self) -> int:
        """Patches per side of one crop (24 for the official 336/14)."""
        vision = self.vision_config()
        return vision.image_size // vision.patch_size

    @property
    def merged_grid(self) -> int:
        """Features per side of one crop after the 2x2 merge (12 officially)."""
        return self.patch_grid // 2

    @property
    def image_dim_out(self) -> int:
        return int(self.img_processor.get("image_dim_out", self.vision_config().hidden_size))

    # ---- official spelling on save -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        rope = copy.deepcopy(output.pop("rope_parameters", None) or {})
        output["rope_theta"] = rope.pop("rope_theta", 10000.0)
        rope.pop("partial_rotary_factor", None)
        rope.pop("original_max_position_embeddings", None)
        rope.pop("factor", None)
        rope_type = rope.pop("rope_type", "default")
        if rope_type == "default":
            output["rope_scaling"] = None
        else:
            output["rope_scaling"] = {"type": "su" if rope_type == "longrope" else rope_type, **rope}
        if "dtype" in output:
            output["torch_dtype"] = output.pop("dtype")
        output["architectures"] = ["Phi3VForCausalLM"]
        output["model_type"] = "phi3_v"
        return output
