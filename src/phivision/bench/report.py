"""The benchmark's tables and `bench.json`: per-method figures, data-path ratios, memory ratios."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def machine_description() -> dict:
    """What the figures were measured on."""
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The short commit of the phivision checkout, when it is one (None for an installed package)."""
    try:
        completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                   capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def flops_text(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.2f} "


def rate_text(value: float) -> str:
    """Three significant digits at least: the real CLIP tower on a CPU trains well under 1 image/s."""
    return f"{value:.2f}" if value >= 10 else f"{value:.3g}"


def bytes_text(value: int) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def compare_summary(paths: dict[str, dict]) -> dict:
    """Throughput ratios of phivision's path over the official recipe's (a/b) and right padding (a/c),
    and the ratio of their peak tensor memory (None for a path not measured)."""
    ours = paths["phivision"]

    def over(name: str, key: str) -> float | None:
        return ratio(ours[key], paths[name][key]) if name in paths else None

    return {
        "a_over_b_images_per_s": over("official", "images_per_s"),
        "a_over_c_images_per_s": over("padded", "images_per_s"),
        "a_over_b_peak_tensors": over("official", "peak_memory_bytes"),
        "first_loss": {name: result["losses"][0] for name, result in paths.items()},
        "mean_loss": {name: sum(result["losses"]) / len(result["losses"]) for name, result in paths.items()},
    }


def memory_ratios(methods: dict[str, dict]) -> dict[str, dict]:
    """Each method's peak memory over full fine-tuning's: tensors, and the whole process's RSS."""
    full = methods.get("full")
    if not full:
        return {}
    return {f"{name}/full": {"tensors": ratio(result["peak_memory_bytes"], full["peak_memory_bytes"]),
                             "rss": ratio(result["peak_rss_bytes"], full["peak_rss_bytes"])}
            for name, result in methods.items() if name != "full"}


def header(settings: dict, machine: dict) -> str:
    source = f"model {settings['model_dir']}" if settings["model_dir"] else f"preset {settings['preset']}"
    threads = settings["threads"] or machine["torch_threads"]
    crops = f" at {settings['num_crops']} crops" if settings.get("num_crops") else ""
    chunk = f" | CLIP in chunks of {settings['vision_crops_per_chunk']} crops" if settings.get(
        "vision_crops_per_chunk") else ""
    micro = f" in passes of {settings['micro_batch']}" if settings.get("micro_batch") else ""
    return (f"phivision bench | {source} | workload {settings['workload']}{crops}{chunk} | "
            f"{settings['batch_size']} samples/step{micro}, "
            f"{settings['steps']} timed steps after {settings['warmup']} warm-up | {machine['device']} "
            f"({threads} threads) | precision {settings['precision']} | attn {settings['attn']}")


def methods_table(methods: dict[str, dict], errors: dict[str, str]) -> str:
    rows = [f"{'method':<14} {'ckpt':>4} {'img/s':>8} {'tokens/s':>9} {'step s (min-max)':>20} {'peak tensors':>12} "
            f"{'peak RSS':>9} {'FLOP/step':>10} {'matmul peak':>12} {'MFU':>6}  loss first -> last"]
    for name, result in methods.items():
        spread = f"{result['step_time_s']:.3f} ({result['step_time_min_s']:.3f}-{result['step_time_max_s']:.3f})"
        rows.append(
            f"{name:<14} {'on' if result['gradient_checkpointing'] else 'off':>4} {rate_text(result['images_per_s']):>8} "
            f"{result['tokens_per_s']:>9.0f} {spread:>20} {bytes_text(result['peak_memory_bytes']):>12} "
            f"{bytes_text(result['peak_rss_bytes']):>9} {flops_text(result['flops_per_step']):>10} "
            f"{flops_text(result['peak_matmul_flops_per_s']) + '/s':>12} "
            f"{100 * result['mfu']:>5.1f}%  {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}"
        )
    rows.extend(f"{name:<14} failed: {message.splitlines()[-1] if message else ''}" for name, message in errors.items())
    return "\n".join(rows)


def compare_table(method: str, paths: dict[str, dict], labels: dict[str, str]) -> str:
    summary = compare_summary(paths)
    rows = [f"compare, method {method}: same samples, same initial weights, one process",
            f"{'data path':<82} {'img/s':>8} {'tokens/s':>9} {'step s':>8} {'MFU':>6} {'first loss':>11} "
            f"{'mean loss':>10} {'peak tensors':>12}"]
    for name, result in paths.items():
        rows.append(
            f"{labels[name]:<82} {rate_text(result['images_per_s']):>8} {result['tokens_per_s']:>9.0f} "
            f"{result['step_time_s']:>8.3f} {100 * result['mfu']:>5.1f}% {result['losses'][0]:>11.5f} "
            f"{summary['mean_loss'][name]:>10.5f} {bytes_text(result['peak_memory_bytes']):>12}"
        )
    figures = (("a/b", "a_over_b_images_per_s", "img/s"), ("a/c", "a_over_c_images_per_s", "img/s"),
               ("a/b", "a_over_b_peak_tensors", "peak tensors"))
    rows.append("    ".join(f"{name} = {summary[key]:.2f}x {unit}" for name, key, unit in figures
                            if summary[key] is not None))
    return "\n".join(rows)


def memory_lines(ratios: dict[str, dict]) -> str:
    return "\n".join(f"peak memory {name}: {values['tensors']:.2f}x tensors, {values['rss']:.2f}x RSS"
                     for name, values in ratios.items())


def one_line(method: str, result: dict) -> str:
    """Progress: one method's headline figures as soon as it is measured."""
    return (f"{method}: {rate_text(result['images_per_s'])} img/s, {result['tokens_per_s']:.0f} tokens/s, "
            f"MFU {100 * result['mfu']:.1f}%, peak tensors {bytes_text(result['peak_memory_bytes'])}, "
            f"peak RSS {bytes_text(result['peak_rss_bytes'])}")


@dataclass
class Document:
    """Everything `bench.json` holds; `results` maps method -> data path -> figures."""

    command: str
    git_commit: str | None
    machine: dict
    settings: dict
    results: dict[str, dict[str, dict]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, method: str, paths: list[dict]) -> None:
        self.results[method] = {path["data_path"]: path for path in paths}

    @property
    def methods(self) -> dict[str, dict]:
        return {method: paths["phivision"] for method, paths in self.results.items()}

    def as_dict(self) -> dict:
        document = {"command": self.command, "git_commit": self.git_commit, "machine": self.machine,
                    "settings": self.settings, "methods": self.methods, "errors": self.errors,
                    "memory_ratios": memory_ratios(self.methods)}
        compared = {method: paths for method, paths in self.results.items() if len(paths) > 1}
        if compared:
            document["compare"] = {method: {"paths": paths, **compare_summary(paths)}
                                   for method, paths in compared.items()}
        return document

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    def tables(self, data_paths: dict) -> str:
        parts = [methods_table(self.methods, self.errors)]
        ratios = memory_ratios(self.methods)
        if ratios:
            parts.append(memory_lines(ratios))
        labels = {name: path.label for name, path in data_paths.items()}
        parts.extend(compare_table(method, paths, labels) for method, paths in self.results.items() if len(paths) > 1)
        return "\n".join(parts)
