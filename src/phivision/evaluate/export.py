"""Merge a LoRA run into its base and write a full checkpoint in the official layout, then check it.

QLoRA adapters were trained against the 4-bit base, so the base is loaded in 4 bits and
dequantised before merging: the merged weights are exactly what the adapter saw.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from phivision.data.collate import Collator
from phivision.data.dataset import ConversationDataset
from phivision.errors import PhivisionError
from phivision.model.weights import check_model_folder, load_model, resolve_dtype
from phivision.processing.folder import save_model_folder
from phivision.processing.processor import ChatTurn, Encoded, Phi3VProcessor

# Largest |logit difference| allowed, relative to the largest |logit|, per export precision.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}


def read_run(run_dir: Path) -> dict:
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise PhivisionError(f"{run_dir} has no config.yaml: is it a phivision training output folder?")
    return yaml.safe_load(config_path.read_text())


def _dequantise_linear4bit(model: nn.Module) -> None:
    """Replace every bitsandbytes 4-bit linear layer by an ordinary one with the same effective weight."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   dtype=torch.float32)
                with torch.no_grad():
                    linear.weight.copy_(weight.float())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias.float())
                setattr(module, child_name, linear)


def adapted_model(run_dir: Path, run: dict) -> nn.Module:
    """The base with the run's adapter applied, unmerged, in fp32 (4-bit bases dequantised)."""
    from peft import PeftModel

    adapter_dir = run_dir / "model"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PhivisionError(f"{adapter_dir} holds no LoRA adapter: only lora/qlora runs need exporting")
    quantization = None
    if run["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        from phivision.train.methods import QLORA_SKIP_MODULES

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=QLORA_SKIP_MODULES,
        )
    base = load_model(run["model"], precision="fp32", attn="sdpa", quantization_config=quantization,
                      device_map="cpu" if quantization else None)
    if quantization is not None:
        _dequantise_linear4bit(base)
        base.is_loaded_in_4bit = False
        base.hf_quantizer = None
        base.config.quantization_config = None
        if hasattr(base, "quantization_method"):
            del base.quantization_method  # else transformers refuses `.to(dtype)` as for a 4-bit model
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def check_sample(run: dict, processor: Phi3VProcessor) -> Encoded:
    """The run's first training sample, or a synthetic one when the data is gone."""
    try:
        dataset = ConversationDataset(run["train_data"], processor, run.get("train_image_root"))
        return dataset[0]
    except (PhivisionError, OSError):
        from PIL import Image

        image = Image.new("RGB", (processor.crop_size * 2, processor.crop_size), (120, 60, 200))
        return processor.encode_conversation("export-check", [ChatTurn("What is shown?", "A square.", [image])])


@torch.no_grad()
def logits_on(model, processor: Phi3VProcessor, encoding: Encoded) -> torch.Tensor:
    batch = Collator(processor.tokenizer.pad_id, processor.crop_size)([encoding])
    batch.pop("labels")
    return model(**batch).logits.float()


def export_run(run_dir: str | Path, out_dir: str | Path, precision: str = "bf16", overwrite: bool = False) -> float:
    """Write the merged checkpoint; returns the max |logit difference| after reloading it."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = read_run(run_dir)
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        base = " (it is the run's base model)" if out_dir.resolve() == Path(run["model"]).resolve() else ""
        raise PhivisionError(f"--out {out_dir} is not empty{base}: choose a new folder, or pass --overwrite "
                             "to write into it")
    check_model_folder(run["model"])
    resolve_dtype(precision)
    # The training processor: the base's geometry and tokenizer with the run's crops (a LoRA run's
    # model/ folder holds the adapter and processor files but no config.json to read geometry from).
    processor = Phi3VProcessor.from_pretrained(run["model"], num_crops=run.get("num_crops"))
    adapted = adapted_model(run_dir, run)
    sample = check_sample(run, processor)
    expected = logits_on(adapted, processor, sample)
    merged = adapted.merge_and_unload()
    save_model_folder(merged, processor, out_dir, precision, base=run["model"])
    reloaded = load_model(out_dir, precision="fp32")
    difference = float((logits_on(reloaded, processor, sample) - expected).abs().max())
    limit = TOLERANCE[precision] * float(expected.abs().max())
    if difference > limit:
        raise PhivisionError(
            f"the exported model's logits differ from the adapter-applied model by {difference:.3g} "
            f"(allowed {limit:.3g} in {precision}); the export in {out_dir} is not trustworthy"
        )
    return difference
