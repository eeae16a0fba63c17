"""Analytic FLOPs of one training step: every matrix product, forward and backward.

Conventions (those of the PaLM MFU definition): a [rows, a] x [a, b] product costs 2*rows*a*b;
attention costs 4*L*L*width per sequence forward (scores and weighted sum, no causal halving)
and twice that backward. A linear layer's backward is one product for its input gradient, run
only when something before it learns, plus one for its weight gradient, only when the weight
learns; so a frozen CLIP tower whose input (pixels) needs no gradient has no backward at all.
Norms, activations, softmax and the optimiser are not counted.

Only useful work counts: CLIP on the crops an image uses, the vocabulary head at the positions
that carry a label, attention within each sample. Padding, padding crops, all-position logits and
cross-sample attention in a packed row count nothing, so every data path is measured against the
same work and MFU ratios equal throughput ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phivision.model.config import Phi3VConfig
from phivision.processing.processor import IGNORE_INDEX, Encoded
from phivision.train.methods import DEFAULT_LORA_GROUPS


@dataclass(frozen=True)
class ModelShape:
    """The sizes FLOPs depend on; `vision_layers` counts only the CLIP layers the features use."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    patch_size: int
    image_size: int
    image_dim_out: int

    @classmethod
    def from_config(cls, config: Phi3VConfig) -> "ModelShape":
        vision = config.vision_config()
        return cls(
            hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
            heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, vocab=config.vocab_size,
            vision_hidden=vision.hidden_size, vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers - 1, patch_size=vision.patch_size,
            image_size=vision.image_size, image_dim_out=config.image_dim_out,
        )

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def qkv_width(self) -> int:
        head_dim = self.hidden // self.heads
        return (self.heads + 2 * self.kv_heads) * head_dim


@dataclass(frozen=True)
class Learning:
    """Which weights get gradients; `lora_*` name the groups that carry adapters of `lora_rank`."""

    embeddings: bool = False
    vision: bool = False
    projector: bool = False  # the image projection and the glb_GN / sub_GN separators
    decoder: bool = False
    lm_head: bool = False
    lora_rank: int = 0
    lora_groups: tuple[str, ...] = ()

    @classmethod
    def for_method(cls, method: str, lora_rank: int = 64, lora_groups: list[str] | None = None) -> "Learning":
        """What `phivision.train.methods.apply_method` trains for each method."""
        if method == "full":
            return cls(embeddings=True, vision=True, projector=True, decoder=True, lm_head=True)
        if method == "freeze_vision":
            return cls(embeddings=True, projector=True, decoder=True, lm_head=True)
        if method == "projector_only":
            return cls(projector=True)
        if method in ("lora", "qlora"):
            return cls(lora_rank=lora_rank, lora_groups=tuple(lora_groups or DEFAULT_LORA_GROUPS))
        raise ValueError(f"unknown method {method!r}")

    def adapter_rank(self, group: str) -> int:
        return self.lora_rank if group in self.lora_groups else 0


@dataclass(frozen=True)
class SampleWork:
    """One sample's useful work: tokens, labelled positions, CLIP crops, image feature tokens."""

    tokens: int
    supervised: int
    crops: int
    image_tokens: int

    @classmethod
    def of(cls, encoding: Encoded, crop_size: int) -> "SampleWork":
        sizes = encoding.image_sizes
        crops = int(((sizes[:, 0] // crop_size) * (sizes[:, 1] // crop_size) + 1).sum()) if len(sizes) else 0
        return cls(
            tokens=len(encoding),
            supervised=int((encoding.labels[1:] != IGNORE_INDEX).sum()),
            crops=crops,
            image_tokens=int((encoding.input_ids < 0).sum()),
        )


@dataclass
class FlopTally:
    """Walks the network in data-flow order; `needs_grad` is whether the current activation does."""

    forward: int = 0
    backward: int = 0
    needs_grad: bool = False

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def linear(self, rows: int, fan_in: int, fan_out: int, learns: bool, lora_rank: int = 0) -> None:
        """One linear layer (with an optional LoRA branch B(A(x))); does not update `needs_grad`."""
        product = 2 * rows * fan_in * fan_out
        self.forward += product
        self.backward += product * (int(self.needs_grad) + int(learns))
        if lora_rank:
            down, up = 2 * rows * fan_in * lora_rank, 2 * rows * lora_rank * fan_out
            self.forward += down + up
            # weight gradients of A and B, input gradient of B, and of A when x needs one
            self.backward += down + up + up + (down if self.needs_grad else 0)

    def learned(self, learns: bool, lora_rank: int = 0) -> None:
        """After a layer whose weights (or adapters) learn, its output needs a gradient."""
        self.needs_grad = self.needs_grad or learns or lora_rank > 0

    def attention(self, sequences: int, length: int, width: int) -> None:
        product = 4 * sequences * length * length * width
        self.forward += product
        self.backward += 2 * product if self.needs_grad else 0


def vision_flops(shape: ModelShape, learning: Learning, work: SampleWork, tally: FlopTally) -> None:
    """CLIP on the used crops (patch convolution and all but the last layer), then the projection."""
    if not work.crops:
        return
    crops, width, rank = work.crops, shape.vision_hidden, learning.adapter_rank("vision")
    rows = crops * (shape.patches + 1)
    tally.linear(crops * shape.patches, 3 * shape.patch_size**2, width, learning.vision)
    tally.learned(learning.vision)
    for _ in range(shape.vision_layers):
        for _projection in ("q", "k", "v"):
            tally.linear(rows, width, width, learning.vision, rank)
        tally.learned(learning.vision, rank)
        tally.attention(crops, shape.patches + 1, width)
        tally.linear(rows, width, width, learning.vision, rank)
        tally.learned(learning.vision, rank)
        tally.linear(rows, width, shape.vision_intermediate, learning.vision, rank)
        tally.learned(learning.vision, rank)
        tally.linear(rows, shape.vision_intermediate, width, learning.vision, rank)
        tally.learned(learning.vision, rank)
    tally.learned(learning.projector)  # the separators join the features here
    projector_rank = learning.adapter_rank("projector")
    tally.linear(work.image_tokens, 4 * shape.image_dim_out, shape.hidden, learning.projector, projector_rank)
    tally.learned(learning.projector, projector_rank)
    tally.linear(work.image_tokens, shape.hidden, shape.hidden, learning.projector, projector_rank)
    tally.learned(learning.projector, projector_rank)


def decoder_flops(shape: ModelShape, learning: Learning, work: SampleWork, tally: FlopTally) -> None:
    """Every decoder layer on every token, attention within the sample, the head at labelled positions."""
    tokens, rank = work.tokens, learning.adapter_rank("decoder")
    tally.learned(learning.embeddings)
    for _ in range(shape.layers):
        tally.linear(tokens, shape.hidden, shape.qkv_width, learning.decoder, rank)
        tally.learned(learning.decoder, rank)
        tally.attention(1, tokens, shape.hidden)
        tally.linear(tokens, shape.hidden, shape.hidden, learning.decoder, rank)
        tally.learned(learning.decoder, rank)
        tally.linear(tokens, shape.hidden, 2 * shape.intermediate, learning.decoder, rank)
        tally.learned(learning.decoder, rank)
        tally.linear(tokens, shape.intermediate, shape.hidden, learning.decoder, rank)
        tally.learned(learning.decoder, rank)
    tally.linear(work.supervised, shape.hidden, shape.vocab, learning.lm_head, learning.adapter_rank("lm_head"))


def sample_flops(shape: ModelShape, learning: Learning, work: SampleWork) -> FlopTally:
    tally = FlopTally()
    vision_flops(shape, learning, work, tally)
    decoder_flops(shape, learning, work, tally)
    return tally


def step_flops(shape: ModelShape, learning: Learning, works: list[SampleWork]) -> int:
    """Forward + backward FLOPs of a step over these samples."""
    return sum(sample_flops(shape, learning, work).total for work in works)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """The best FLOP/s of a large square matrix product: the denominator of MFU, measured here."""
    import time

    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    products = 20 if device.type == "cuda" else 1  # a GPU product is too short to time alone
    best = float("inf")
    for attempt in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(products):
            left @ right
        synchronize(device)
        if attempt >= 2:  # the first products pay for allocation and kernel selection
            best = min(best, (time.perf_counter() - start) / products)
    return 2 * size**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
