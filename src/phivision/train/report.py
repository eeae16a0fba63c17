"""`report.md` and `loss.png` for a run, from its `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

from phivision.train.config import TrainConfig


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`; a line cut off by a killed process is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(records: list[dict], path: Path) -> bool:
    """Train loss, eval loss and any eval metric against the step; False when there is nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: a notebook's plotting backend stays as it was

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    metric_keys = sorted({k for r in records for k in r if k.startswith("eval_") and k not in
                          ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")})
    if not train:
        return False
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    loss_axis = figure.add_subplot()
    loss_axis.plot(*zip(*train), label="train loss")
    if evals:
        loss_axis.plot(*zip(*evals), "o-", label="eval loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    if metric_keys:
        metric_axis = loss_axis.twinx()
        for key in metric_keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            metric_axis.plot(*zip(*points), "s--", label=key)
        metric_axis.set_ylabel("metric")
        metric_axis.legend(loc="upper right")
    loss_axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def write_report(output_dir: Path, config: TrainConfig, steps: int, samples: int, skipped: int) -> Path:
    records = read_metrics(output_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    speeds = [r["images_per_second"] for r in records if "images_per_second" in r]
    summary = [r for r in records if "train_runtime" in r]
    lines = [
        f"# phivision run: {output_dir.name}",
        "",
        f"- method **{config.method}**, precision {config.precision}, attention {config.attn}, "
        f"num_crops {config.num_crops}, packing {config.packing}",
        f"- base model `{config.model}`, data `{config.train_data}`: {samples} samples"
        + (f", {skipped} skipped" if skipped else ""),
        f"- {steps} optimiser steps, global batch {config.global_batch_size}, "
        f"learning rate {config.resolved_learning_rate:g}",
    ]
    if losses:
        lines.append(f"- train loss {losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last log)")
    if speeds:
        lines.append(f"- throughput {sum(speeds) / len(speeds):.2f} images/s (mean of logged windows)")
    if summary:
        lines.append(f"- wall time {summary[-1]['train_runtime']:.1f} s")
    for key in sorted({k for r in records for k in r if k.startswith("eval_")}):
        values = [r[key] for r in records if key in r]
        lines.append(f"- {key}: {values[-1]:.4f} (last), {len(values)} evaluations")
    if plot_curves(records, output_dir / "loss.png"):
        lines += ["", "![loss](loss.png)"]
    path = output_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
