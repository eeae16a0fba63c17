"""Training methods: which weights load how, and which of them learn.

| method         | learns                                                     |
|----------------|------------------------------------------------------------|
| full           | everything (but the two CLIP parts the features never use) |
| freeze_vision  | everything but the CLIP tower (text embeddings do learn)   |
| projector_only | the image projection and the two separators                |
| lora / qlora   | low-rank adapters; qlora keeps the decoder in 4-bit NF4    |
"""

from __future__ import annotations

import os

import torch

from phivision.errors import PhivisionError
from phivision.model.modeling import Phi3VForCausalLM
from phivision.model.weights import load_model, resolve_dtype
from phivision.train.config import TrainConfig

LORA_GROUPS = ("decoder", "vision", "projector", "lm_head")
DEFAULT_LORA_GROUPS = ["decoder", "vision", "projector"]
VISION_PREFIX = r"model\.vision_embed_tokens\."
# Kept unquantised by QLoRA: the vision tower, the projector and the output head.
QLORA_SKIP_MODULES = ["model.vision_embed_tokens", "lm_head"]


def compute_dtype(config: TrainConfig) -> torch.dtype:
    """The precision the forward pass runs in; `auto` is bf16 on a GPU that has it, else fp32."""
    return resolve_dtype(config.precision)


def weight_dtype(config: TrainConfig) -> torch.dtype:
    """Frozen bases load in the compute precision; trained full weights stay fp32 (autocast does the rest)."""
    if config.method in ("lora", "qlora"):
        return compute_dtype(config) if compute_dtype(config) != torch.float16 else torch.float32
    return torch.float32


def lora_target_pattern(model: Phi3VForCausalLM, targets: list[str] | None) -> str:
    """A full-match regex over module names; groups expand to the official LoRA targets.

    The last CLIP layer is never targeted: its output is unused, so adapters there would get no
    gradient and break DDP.
    """
    targets = targets or DEFAULT_LORA_GROUPS
    used_vision_layers = len(model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers) - 1
    vision_layers = "|".join(str(i) for i in range(used_vision_layers))
    groups = {
        "decoder": r"model\.layers\.\d+\.(?:self_attn\.(?:qkv_proj|o_proj)|mlp\.(?:gate_up_proj|down_proj))",
        "vision": VISION_PREFIX + rf"img_processor\.vision_model\.encoder\.layers\.(?:{vision_layers})\."
        r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))",
        "projector": VISION_PREFIX + r"img_projection\.(?:0|2)",
        "lm_head": r"lm_head",
    }
    patterns = []
    for target in targets:
        if target in groups:
            patterns.append(groups[target])
        elif target.replace("_", "").isalnum():
            patterns.append(rf"(?!{VISION_PREFIX}img_processor\.vision_model\.encoder\.layers\.{used_vision_layers}\.).*\.{target}")
        else:
            raise PhivisionError(
                f"lora_targets entry {target!r} is neither a group ({', '.join(LORA_GROUPS)}) nor a module name"
            )
    return "^(?:" + "|".join(patterns) + ")$"


def load_for_training(config: TrainConfig, device_map: str | dict | None = None) -> torch.nn.Module:
    """Load the base model as the method needs it (4-bit for qlora) and mark what learns."""
    quantization = None
    if config.method == "qlora":
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise PhivisionError("method qlora needs bitsandbytes: pip install 'phivision[qlora]'") from None
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(config),
            llm_int8_skip_modules=QLORA_SKIP_MODULES,
        )
        # Each process holds its own 4-bit copy, on its own GPU under torchrun.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_map = device_map or ({"": local_rank} if torch.cuda.is_available() else "cpu")
    model = load_model(
        config.model, precision=weight_dtype(config), attn=config.attn,
        quantization_config=quantization, device_map=device_map,
    )
    if quantization is not None:
        keep_4bit_layout(model)
    return apply_method(model, config)


def keep_4bit_layout(model: Phi3VForCausalLM) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16 its first no-grad forward (the task metric during training)
    rewrites each weight in place into a layout that needs sizes divisible by 32 and that
    training's forward does not take back; training keeps the one layout it quantised.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_method(model: Phi3VForCausalLM, config: TrainConfig) -> torch.nn.Module:
    """Set requires_grad per method; adapters are added by peft. Returns the model to train."""
    vision = model.model.vision_embed_tokens
    vision.crops_per_chunk = config.vision_crops_per_chunk
    if config.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        # Not peft's prepare_model_for_kbit_training: it lifts every unquantised weight (CLIP, the
        # projector, embeddings, lm_head: ~1 GB at the official shape) to fp32. The frozen base stays
        # in the compute dtype as for lora; get_peft_model freezes it and keeps the adapters in fp32,
        # and the Trainer turns on gradient checkpointing (non-reentrant: inputs need no grad).
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.resolved_lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_target_pattern(model, config.lora_targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(config.seed)  # adapters start from the run's seed, not from what ran before in the process
        return get_peft_model(model, lora)
    model.requires_grad_(config.method != "projector_only")
    if config.method == "freeze_vision":
        vision.img_processor.requires_grad_(False)
    if config.method == "projector_only":
        for parameter in (vision.glb_GN, vision.sub_GN, *vision.img_projection.parameters()):
            parameter.requires_grad_(True)
    vision.img_processor.freeze_unused()
    return model


def parameter_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters as the architecture has them: a 4-bit weight stores two in each byte."""
    count = 0
    for parameter in model.parameters():
        if trainable_only and not parameter.requires_grad:
            continue
        packed = type(parameter).__name__ == "Params4bit"
        count += parameter.numel() * (2 * parameter.element_size() if packed else 1)
    return count


def trainable_summary(model: torch.nn.Module) -> str:
    trainable, total = parameter_count(model, trainable_only=True), parameter_count(model)
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
