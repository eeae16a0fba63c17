"""Phi-3-V built from `transformers`' Phi-3 decoder and CLIP vision parts.

No remote code: the decoder is `Phi3Model` (so sdpa / eager / flash-attention, gradient
checkpointing, packed sequences and the KV cache come from `transformers`), and the image
features replace the embeddings at the negative placeholder ids the processor writes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, Phi3ForCausalLM, Phi3Model
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel

from phivision.errors import PhivisionError
from phivision.model.config import Phi3VConfig
from phivision.model.vision import Phi3VImageEmbedding

IGNORE_INDEX = -100
PACKED_SDPA = "phivision_packed_sdpa"


def packed_segments(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                    sliding_window: int | None) -> list[tuple[int, int]] | None:
    """(start, end) of every sample in one packed row (positions restart), else None.

    A new sample starts wherever the position does not follow the previous one, the rule
    `transformers` uses to build the block-diagonal mask of a packed row.
    """
    length = query.shape[2]
    if (position_ids is None or query.shape[0] != 1 or key.shape[2] != length
            or position_ids.shape != (1, length) or length < 2):
        return None
    breaks = (torch.diff(position_ids[0]) != 1).nonzero().flatten().add(1).tolist()
    if not breaks:
        return None
    edges = [0, *breaks, length]
    if sliding_window and max(end - start for start, end in zip(edges, edges[1:])) > sliding_window:
        return None
    return list(zip(edges, edges[1:]))


def packed_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """sdpa that runs each sample of a packed row on its own, with the causal kernel.

    Plain sdpa gets a block-diagonal mask over the whole row: it computes every sample against
    every other and loses the causal fast path (a quarter of a small model's CPU training step).
    Anything else (padding masks, batches, the KV cache) goes to plain sdpa.
    """
    segments = packed_segments(position_ids, query, key, kwargs.get("sliding_window"))
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
                               **kwargs)[0]
        for start, end in segments
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


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
            if self.training and torch.is_grad_enabled():
                return embeddings + self._vision_pass_contributing_nothing(embeddings)
            return embeddings
        features = self.vision_embed_tokens(pixel_values, image_sizes)
        if features.shape[0] != num_placeholders:
            raise PhivisionError(
                f"the images give {features.shape[0]} feature tokens but the input has "
                f"{num_placeholders} placeholder tokens: the processor and model geometry disagree"
            )
        return embeddings.masked_scatter(placeholders.unsqueeze(-1), features.to(embeddings.dtype))

    def _vision_pass_contributing_nothing(self, embeddings: torch.Tensor) -> torch.Tensor:
        """A zero scalar that has run the whole vision path on one blank 1x1-crop image.

        Text-only micro-batches are valid data, but in training every rank must run the same graph:
        under DDP a vision weight without a gradient on one rank breaks (or hangs) the reduction, and
        under ZeRO-3 a rank that skips the tower would skip its parameter gathers. The blank image's
        features times zero give every vision weight an exact zero gradient and change no value.
        """
        size = self.vision_embed_tokens.crop_size
        blank = embeddings.new_zeros(1, 2, 3, size, size)  # the global view and one crop
        image_sizes = torch.tensor([[size, size]], device=embeddings.device)
        return self.vision_embed_tokens(blank, image_sizes).sum().to(embeddings.dtype) * 0


class Phi3VForCausalLM(Phi3ForCausalLM):
    config_class = Phi3VConfig
    base_model_prefix = "model"
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"model\.vision_embed_tokens\.wte\.weight"]
    _tied_weights_keys = {}
    # In training, logits are computed only where a label is set (the loss is the same); False
    # computes them at every position, as the official code does (for benchmarks).
    supervised_logits_only: bool = True

    def __init__(self, config: Phi3VConfig):
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config._attn_implementation == "sdpa":  # the decoder's; CLIP keeps plain sdpa
            config._attn_implementation = PACKED_SDPA

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
        if self._keeps_supervised_logits_only(labels, logits_to_keep, kwargs):
            # Prompt and image tokens carry no label: projecting them onto the vocabulary would be
            # most of the head's work (and memory) for nothing. Logits come back flattened, [n, vocab].
            shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
            logits_to_keep = shift_labels != IGNORE_INDEX
            kwargs["shift_labels"] = shift_labels[logits_to_keep]
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

    def _keeps_supervised_logits_only(self, labels, logits_to_keep, kwargs: dict) -> bool:
        keeps_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        return (self.training and self.supervised_logits_only and labels is not None and keeps_all
                and "shift_labels" not in kwargs)

    def prepare_inputs_for_generation(self, input_ids, cache=None, pixel_values=None, image_sizes=None, **kwargs):
        """Images enter once, with the prompt; later steps read their features from the cache."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, **kwargs)
        prefilling = cache is None or cache.get_seq_length() == 0
        if prefilling:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        return model_inputs
