"""Evaluate a model on a jsonl dataset: generate, score, write predictions and metrics.

Under `torchrun` every rank generates for its own shard (positions rank, rank + world, ...,
padded to one length) and rank 0 gathers them, so each sample is scored exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from phivision.data.dataset import ConversationDataset
from phivision.data.format import Sample
from phivision.evaluate.generate import generate_dataset
from phivision.evaluate.metrics import (
    anls,
    confusion_matrix,
    exact_match,
    format_confusion_matrix,
    per_class_accuracy,
    pick_metric,
    plot_confusion_matrix,
)
from phivision.processing.processor import Phi3VProcessor

# A classification task: few distinct answers. Above this, no confusion matrix is drawn.
MAX_CLASSES = 50


def references(sample: Sample) -> list[str]:
    """All reference answers: the `answers` field when present, else the last assistant turn."""
    return list(sample.answers) if sample.answers else [sample.turns[-1].assistant]


def score(prediction: str, refs: list[str], metric: str) -> float:
    return anls(prediction, refs) if metric == "anls" else max(exact_match(prediction, ref) for ref in refs)


def shard(positions: list[int], rank: int, world: int) -> list[int]:
    """This rank's positions, padded with a repeat to the same count on every rank.

    Under ZeRO-3 each forward pass gathers weights from all ranks, so every rank must make the
    same number of `generate` calls; a repeated sample is generated twice and scored once.
    """
    mine = positions[rank::world]
    if not positions:
        return mine
    count = -(-len(positions) // world)
    return mine + [mine[-1] if mine else positions[0]] * (count - len(mine))


def _gather(predictions: dict[int, str]) -> dict[int, str]:
    if not (dist.is_available() and dist.is_initialized()):
        return predictions
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, predictions)
    merged: dict[int, str] = {}
    for shard in shards:
        merged.update(shard)
    return merged


def evaluate_dataset(
    model,
    processor: Phi3VProcessor,
    data: str | Path,
    image_root: str | Path | None = None,
    metric: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    lines: list[int] | None = None,
    description: str = "generate",
) -> dict:
    """Metrics on rank 0 (other ranks return {}); files in `out_dir` when given.

    `lines` picks the jsonl's samples by position (training passes those that passed its check).
    """
    dataset = ConversationDataset(data, processor, image_root, indices=lines, for_generation=True)
    positions = list(range(len(dataset)))[: limit or None]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    predictions = _gather(generate_dataset(model, dataset, shard(positions, rank, world), batch_size, max_new_tokens,
                                           progress and rank == 0, description))
    if rank != 0:
        return {}
    samples = [dataset.sample(position) for position in positions]
    if metric == "auto":
        metric = pick_metric([sample.answers for sample in samples])
    records = []
    for position, sample in zip(positions, samples):
        refs = references(sample)
        prediction = predictions[position]
        records.append({"id": sample.id, "prompt": sample.turns[-1].user, "prediction": prediction,
                        "reference": refs[0] if len(refs) == 1 else refs, "score": score(prediction, refs, metric)})
    metrics = {"metric": metric, metric: sum(r["score"] for r in records) / max(len(records), 1),
               "samples": len(records)}
    labels = [references(sample)[0] for sample in samples]
    classification = metric == "accuracy" and len(set(labels)) <= MAX_CLASSES
    if classification:
        metrics["per_class_accuracy"] = per_class_accuracy([r["prediction"] for r in records], labels)
    if out_dir is not None:
        write_results(Path(out_dir), records, metrics, labels if classification else None)
    return metrics


def write_results(out_dir: Path, records: list[dict], metrics: dict, labels: list[str] | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "predictions.jsonl").open("w") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if labels is not None:
        names, matrix = confusion_matrix([r["prediction"] for r in records], labels)
        (out_dir / "confusion_matrix.txt").write_text(format_confusion_matrix(names, matrix) + "\n")
        plot_confusion_matrix(names, matrix, out_dir / "confusion_matrix.png")
