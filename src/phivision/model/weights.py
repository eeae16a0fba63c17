"""Loading and saving checkpoints in the official layout, strictly and without remote code."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from phivision.errors import PhivisionError
from phivision.model.config import Phi3VConfig
from phivision.model.modeling import Phi3VForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
OFFICIAL_SHARD_SIZE = "5GB"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SAFETENSORS_HEADER = 100_000_000  # the format's own limit on the JSON header
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


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
    """A local Phi-3-V folder whose config and safetensors weights are whole; pickle weights are refused.

    Only headers are read, so a broken folder fails in one line before any data is decoded, not in a
    traceback from deep inside loading.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PhivisionError(f"model folder {folder} does not exist (models are loaded from local folders only)")
    if not (folder / "config.json").is_file():
        raise PhivisionError(f"{folder} has no config.json: is it a Phi-3-V checkpoint folder?")
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != Phi3VConfig.model_type:
        raise PhivisionError(f"{folder / 'config.json'} has model_type {model_type!r}: phivision loads Phi-3-V "
                             f"checkpoints ({Phi3VConfig.model_type!r}) only")
    for shard in _weight_files(folder):
        _check_safetensors(shard)
    return folder


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise PhivisionError(f"{path} is not valid JSON ({error}): restore it from the original checkpoint") from None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files the folder's loader reads: the single file, or every shard of the index."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / INDEX_FILE).is_file():
        index = _read_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise PhivisionError(f"{folder / INDEX_FILE} has no weight_map: restore it from the original checkpoint")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise PhivisionError(f"{folder} lacks {', '.join(missing)} named in {INDEX_FILE}: the download or copy "
                                 "is incomplete; fetch the missing shard(s)")
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PhivisionError(
            f"{folder} holds pickle weights ({', '.join(pickles)}), which phivision refuses to load "
            "because unpickling runs arbitrary code; convert them to safetensors first"
        )
    raise PhivisionError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}")


def _check_safetensors(path: Path) -> None:
    """The header parses and the file is as long as the tensors it lists: a cut-off copy is caught here."""
    size = path.stat().st_size
    broken = f"{path} is not a whole safetensors file"
    with path.open("rb") as file:
        prefix = file.read(8)
        header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_length <= min(size - 8, MAX_SAFETENSORS_HEADER):
            raise PhivisionError(f"{broken} (no readable header): re-download or re-save it")
        try:
            header = json.loads(file.read(header_length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise PhivisionError(f"{broken} (its header is not valid): re-download or re-save it") from None
    expected = 8 + header_length + int(end)
    if size != expected:
        raise PhivisionError(f"{broken}: its header lists {expected} bytes, the file has {size} (a cut-off download "
                             "or copy?): re-download or re-save it")


def has_weights(folder: str | Path) -> list[str]:
    """Names of the weight files directly in `folder` (none when it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) or p.name == INDEX_FILE)


def current_umask() -> int:
    """The process umask; read without changing it where Linux allows (other threads may be writing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_umask(folder: str | Path) -> None:
    """Give written safetensors files the mode every other file gets (0o666 & ~umask).

    safetensors writes through a private temporary file and renames it, so weights end up 0600
    while the json beside them is 0644: teammates on a shared filesystem could read the config of a
    checkpoint but not its weights.
    """
    mode = 0o666 & ~current_umask()
    for path in Path(folder).glob("*.safetensors"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


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
        share_like_umask(folder)
    finally:
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.data = original[name]
