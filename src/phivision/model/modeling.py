"""Phi-3-V built from `transformers`' Phi-3 decoder and CLIP vision parts.

No remote code: the decoder is `Phi3Model` (so sdpa / eager / flash-attention, gradient
checkpointing, packed sequences and the KV cache come from `transformers`), and the image
features replace the embeddings at the negative placeholder ids the processor writes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Phi3ForCausalLM, Phi3Model
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel

from phivision.errors import PhivisionError
from phivision.model.config import Phi3VConfig
from phivision.model.vision import Phi3VImageEmbedding


class Phi3VModel(Phi3Model):
    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written over every negative placeholder id."""
        placeholders = input_ids < 0
        embeddings = self.embed_tokens(input_ids.clamp_min(0))
        num_placeholders = int(placeholders.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if num_placeholders:
                raise PhivisionError(
                    f"the input has {num_placeholders} image placeholder tokens but no pixel_values"
                )
            return embeddings
        features = self.vision_embed_tokens(pixel_values, image_sizes)
        if features.shape[0] != num_placeholders:
            raise PhivisionError(
                f"the images give {features.shape[0]} feature tokens but the input has "
                f"{num_placeholders} placeholder tokens: the processor and model geometry disagree"
            )
        return embeddings.masked_scatter(placeholders.unsqueeze(-1), features.to(embeddings.dtype))


class Phi3VForCausalLM(Phi3ForCausalLM):
    config_class = Phi3VConfig
    base_model_prefix = "model"
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"model\.vision_embed_tokens\.wte\.weight"]
    _tied_weights_keys = {}

    def __init__(self, config: Phi3VConfig):
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.model.embed(input_ids, pixel_values, image_sizes)
        if use_cache is None and (labels is not None or self.training):
            use_cache = False  # training needs no cache, and packed rows are only detected without one
        return super().forward(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, input_ids, cache=None, pixel_values=None, image_sizes=None, **kwargs):
        """Images enter once, with the prompt; later steps read their features from the cache."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, **kwargs)
        prefilling = cache is None or cache.get_seq_length() == 0
        if prefilling:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        return model_inputs
