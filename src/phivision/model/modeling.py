"""Phi-3-V built from `transformers`' Phi-3 decoder and CLIP vision parts.

No remote code: the decoder is `Phi3Model` (so sdpa / eager / flash-attention, gradient
checkpointing, packed sequences and the KV cache come from `transformers`), and the image
features replace the embeddings at the negative placeholder ids the processor writes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, GenerationMixin, Phi3ForCausalLM, Phi3Model
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel, Phi3RotaryEmbedding

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


def sequence_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the length of the sequence it belongs to (same shape as `position_ids`).

    A sequence is a run of consecutive positions: a packed sample, the real tokens of a padded row
    (padding sits at position 0), or the one new token of a cached generation step. Its length is
    its last position + 1.
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[..., 1:] = position_ids[..., 1:] - position_ids[..., :-1] != 1
    sequence = starts.flatten().cumsum(0) - 1  # every row starts a sequence, so ids never span rows
    last = torch.zeros(sequence.numel(), dtype=position_ids.dtype, device=position_ids.device)
    last.scatter_reduce_(0, sequence, position_ids.flatten(), reduce="amax", include_self=False)
    return (last[sequence] + 1).view(position_ids.shape)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over the real tokens of each row, padding at 0 (as `generate` makes them)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class SampleRotaryEmbedding(Phi3RotaryEmbedding):
    """LongRoPE with the short/long factors chosen per sequence, not per batch.

    `transformers` picks one factor set from the largest position of the whole batch, so a short
    sample packed or padded beside a long one would get the long factors and a different loss.
    Here every token takes the factors of its own sequence (see `sequence_lengths`): long when
    that sequence is longer than `original_max_position_embeddings`, the official rule for one
    sequence, so a sequence alone gets exactly `transformers`' cos/sin.
    """

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_type != "longrope":
            return super().forward(x, position_ids)
        threshold = self.config.rope_parameters["original_max_position_embeddings"]
        is_long = (sequence_lengths(position_ids) > threshold)[..., None]
        inv_freq = torch.where(is_long, self._long_inv_freq(x.device), self.original_inv_freq.to(x.device))
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def _long_inv_freq(self, device: torch.device) -> torch.Tensor:
        """Computed on first use: a buffer would be reset by the loader's init of rotary modules."""
        cached = getattr(self, "long_inv_freq", None)
        if cached is None or cached.device != device:
            threshold = self.config.rope_parameters["original_max_position_embeddings"]
            cached, _ = ROPE_INIT_FUNCTIONS["longrope"](self.config, device, seq_len=threshold + 1)
            self.long_inv_freq = cached
        return cached


class Phi3VModel(Phi3Model):
    """The Phi-3 decoder with the image embedding (`vision_embed_tokens`) beside its token embedding."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.rotary_emb = SampleRotaryEmbedding(config)

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        full_pass: bool = True,
    ) -> torch.Tensor:
        """Token embeddings with image features written over every negative placeholder id.

        `full_pass` is False for a generation step that reads the earlier tokens from the cache:
        such steps never carry images, on any rank.
        """
        placeholders = input_ids < 0
        embeddings = self.embed_tokens(input_ids.clamp_min(0))
        num_placeholders = int(placeholders.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if num_placeholders:
                raise PhivisionError(
                    f"the input has {num_placeholders} image placeholder tokens but no pixel_values"
                )
            if (self.training and torch.is_grad_enabled()) or (full_pass and self._vision_weights_partitioned()):
                return embeddings + self._vision_pass_contributing_nothing(embeddings)
            return embeddings
        features = self.vision_embed_tokens(pixel_values, image_sizes)
        if features.shape[0] != num_placeholders:
            raise PhivisionError(
                f"the images give {features.shape[0]} feature tokens but the input has "
                f"{num_placeholders} placeholder tokens: the processor and model geometry disagree"
            )
        return embeddings.masked_scatter(placeholders.unsqueeze(-1), features.to(embeddings.dtype))

    @staticmethod
    def _vision_weights_partitioned() -> bool:
        """Under ZeRO-3 every rank must run the tower in evaluation too: each module gathers its weights
        from all ranks as it runs, so a rank with a text-only batch aborted the others' gathers.

        (Asked of transformers, not of a weight: reading a partitioned weight from another module's
        forward makes DeepSpeed fetch it there and breaks its recorded fetch order.)
        """
        from transformers.integrations import is_deepspeed_zero3_enabled

        return is_deepspeed_zero3_enabled()

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


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a loss needs logits ([batch, length] bool: the next token has a label) and those labels.

    Prompt and image tokens carry no label: projecting them onto the vocabulary would be most of
    the head's work (and memory) for nothing. With the mask as `logits_to_keep`, logits come back
    flattened, [n, vocab], in the order of the returned labels.
    """
    shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    keep = shift_labels != IGNORE_INDEX
    return keep, shift_labels[keep]


class Phi3VForCausalLM(Phi3ForCausalLM):
    """Phi-3-V with its language-model head, under the official checkpoint's parameter names."""

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
            full_pass = cache is None or cache.get_seq_length() == 0
            inputs_embeds = self.model.embed(input_ids, pixel_values, image_sizes, full_pass)
        if use_cache is None and (labels is not None or self.training):
            use_cache = False  # training needs no cache, and packed rows are only detected without one
        if position_ids is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            # A padded row's rope must not see the padding: its length is its real tokens.
            position_ids = positions_from_mask(attention_mask)[:, -inputs_embeds.shape[1]:]
        if self._keeps_supervised_logits_only(labels, logits_to_keep, kwargs):
            logits_to_keep, kwargs["shift_labels"] = supervised_positions(labels)
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
        """Images enter with every full pass; cached steps read their features from the cache.

        A row growing past `original_max_position_embeddings` switches to the long rope factors at
        all its positions, so its cached keys (rotated with the short ones) are stale: the cache is
        dropped and the whole sequence runs again, images included. Rows of a left-padded batch
        cross at different steps, each crossing runs once more; every row then gets the tokens of
        its own greedy loop without a cache. (`Phi3ForCausalLM`'s own rule looks at the padded
        length only, so it is bypassed.)
        """
        if cache is not None and self._row_crosses_rope_threshold(input_ids, cache, kwargs.get("position_ids")):
            cache = None
            kwargs["next_sequence_length"] = None
        model_inputs = GenerationMixin.prepare_inputs_for_generation(self, input_ids, cache=cache, **kwargs)
        if cache is None or cache.get_seq_length() == 0:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        return model_inputs

    def _row_crosses_rope_threshold(self, input_ids, cache, position_ids) -> bool:
        """True when some row was at most `original_max_position_embeddings` long when cached and is longer now."""
        rope = self.config.rope_parameters
        cached = cache.get_seq_length()
        if rope.get("rope_type") != "longrope" or cached == 0:
            return False
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        threshold = rope["original_max_position_embeddings"]
        before, now = position_ids[:, cached - 1] + 1, position_ids[:, -1] + 1
        return bool(((before <= threshold) & (now > threshold)).any())
