"""Batched greedy generation: left-padded prompts, KV cache, stop at `<|end|>` / `<|endoftext|>`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from phivision.data.collate import left_padded_prompts
from phivision.data.dataset import ConversationDataset
from phivision.errors import PhivisionError
from phivision.model.weights import load_model
from phivision.processing.processor import PREPROCESSOR_FILE, Encoded, Phi3VProcessor


def load_for_inference(model_dir: str | Path, adapter: str | Path | None = None, precision: str = "auto",
                       attn: str = "sdpa") -> torch.nn.Module:
    """A base folder, optionally with a LoRA adapter applied (not merged), in eval mode."""
    model = load_model(model_dir, precision=precision, attn=attn)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise PhivisionError(f"--adapter {adapter}: no adapter_config.json there")
        model = PeftModel.from_pretrained(model, str(adapter))
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval()


def inference_processor(model_dir: str | Path, adapter: str | Path | None = None,
                        num_crops: int | None = None) -> Phi3VProcessor:
    """The base's geometry; crops as given, else as the adapter was trained with, else the base's."""
    if num_crops is None and adapter is not None:
        trained = Path(adapter) / PREPROCESSOR_FILE
        if trained.is_file():
            num_crops = json.loads(trained.read_text()).get("num_crops")
    return Phi3VProcessor.from_pretrained(model_dir, num_crops=num_crops)


def batches(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


@torch.no_grad()
def generate(model, processor: Phi3VProcessor, prompts: list[Encoded], max_new_tokens: int = 64,
             streamer=None) -> list[str]:
    """Greedy answers for a batch of generation prompts, decoded without special tokens."""
    tokenizer = processor.tokenizer
    batch = left_padded_prompts(prompts, tokenizer.pad_id, processor.crop_size)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.stop_ids,
        pad_token_id=tokenizer.pad_id,
        streamer=streamer,
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(row.tolist()).strip() for row in new_tokens]


def generate_dataset(model, dataset: ConversationDataset, indices: list[int], batch_size: int,
                     max_new_tokens: int, progress: bool = True, description: str = "generate") -> dict[int, str]:
    """Predictions for the given dataset positions, keyed by position; the bar goes when it is done."""
    from tqdm.auto import tqdm

    predictions: dict[int, str] = {}
    bar = tqdm(total=len(indices), desc=description, disable=not progress, dynamic_ncols=True, leave=False)
    for chunk in batches(indices, batch_size):
        answers = generate(model, dataset.processor, [dataset[i] for i in chunk], max_new_tokens)
        predictions.update(zip(chunk, answers))
        bar.update(len(chunk))
    bar.close()
    return predictions
