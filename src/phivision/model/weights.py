"""Loading and saving checkpoints in the official layout, strictly and without remote code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from phivision.errors import PhivisionError
from phivision.model.config import Phi3VConfig
from phivision.model.modeling import Phi3VForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
OFFICIAL_SHARD_SIZE = "5GB"


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """A precision name as a dtype; `auto` is bf16 on a GPU that has it, else fp32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise PhivisionError(f"unknown precision {name!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_attention(attn: str) -> None:
    """flash-attn is optional and GPU-only: say so up front instead of failing inside a layer."""
    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise PhivisionError(f"unknown attention {attn!r}: choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise PhivisionError(
                "attn=flash_attention_2 needs the flash-attn package, which is not installed: "
                "install it on a CUDA machine with `pip install 'phivision[flash]'`, or use attn=sdpa"
            )
        if not torch.cuda.is_available():
            raise PhivisionError("attn=flash_attention_2 needs a CUDA GPU; on this machine use attn=sdpa")


def check_model_folder(folder: str | Path) -> Path:
    """A local folder with config.json and safetensors weights; pickle weights are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PhivisionError(f"model folder {folder} does not exist (models are loaded from local folders only)")
    if not (folder / "config.json").is_file():
        raise PhivisionError(f"{folder} has no config.json: is it a Phi-3-V checkpoint folder?")
    has_safetensors = (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file()
    if not has_safetensors:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise PhivisionError(
                f"{folder} holds pickle weights ({', '.join(pickles)}), which phivision refuses to load "
                "because unpickling runs arbitrary code; convert them to safetensors first"
            )
        raise PhivisionError(f"{folder} has no model.safetensors or model.safetensors.index.json")
    return folder


def load_model(
    folder: str | Path,
    precision: str | torch.dtype = "fp32",
    attn: str = "sdpa",
    quantization_config=None,
    device_map=None,
) -> Phi3VForCausalLM:
    """Load a checkpoint folder (single or sharded safetensors); any missing or unexpected key is an error."""
    folder = check_model_folder(folder)
    check_attention(attn)
    config = Phi3VConfig.from_pretrained(folder)
    model, info = Phi3VForCausalLM.from_pretrained(
        folder,
        config=config,
        dtype=resolve_dtype(precision),
        attn_implementation=attn,
        quantization_config=quantization_config,
        device_map=device_map,
        use_safetensors=True,
        output_loading_info=True,
    )
    problems = []
    if info.get("missing_keys"):
        problems.append("missing keys: " + ", ".join(sorted(info["missing_keys"])))
    if info.get("unexpected_keys"):
        problems.append("unexpected keys: " + ", ".join(sorted(info["unexpected_keys"])))
    if info.get("mismatched_keys"):
        problems.append("keys with the wrong shape: " + ", ".join(str(k) for k in info["mismatched_keys"]))
    if problems:
        raise PhivisionError(f"{folder} does not match its config.json: " + "; ".join(problems))
    model.model.vision_embed_tokens.img_processor.freeze_unused()
    return model


def save_model(model: Phi3VForCausalLM, folder: str | Path, precision: str | torch.dtype | None = None) -> None:
    """Write safetensors with the official key names and 5 GB shards, plus config.json.

    With `precision`, cast copies are written and the caller's model (a run's result, still to be
    evaluated) keeps its own weights, bit for bit.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    original = {name: tensor.data for name, tensor in model.state_dict(keep_vars=True).items()}
    if precision is not None:
        model.to(resolve_dtype(precision))
    try:
        model.save_pretrained(folder, max_shard_size=OFFICIAL_SHARD_SIZE, safe_serialization=True)
    finally:
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.data = original[name]
