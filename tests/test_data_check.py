"""The up-front data check: sizes from headers once per path, shared over ranks, and what a file
that only looks whole does when training reaches it."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import base_config, phivision_in_process, run_on_two_processes, write_lines, write_yaml
from PIL import Image, ImageFile

from phivision.data import dataset as dataset_module
from phivision.data.dataset import ConversationDataset, check_dataset
from phivision.processing.images import image_size, load_image
from phivision.train.config import ConfigError, load_config

EXIF_ORIENTATION = 0x0112


def write_rotated_jpeg(path: Path, width: int = 120, height: int = 40, orientation: int = 6) -> Path:
    """A wide JPEG whose EXIF says "rotate 90 degrees": a viewer would show it tall."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    exif = Image.Image().getexif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, "JPEG", exif=exif)
    return path


def write_pages(folder: Path) -> Path:
    """Many questions about few images (PNG, JPEG, an EXIF-rotated JPEG), and two bad lines."""
    images = folder / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (90, 36), "white").save(images / "wide.png")
    Image.new("L", (30, 80), 128).save(images / "tall.jpg")
    write_rotated_jpeg(images / "rotated.jpg")
    records = []
    for number in range(24):
        name = ["wide.png", "tall.jpg", "rotated.jpg"][number % 3]
        records.append({"id": f"q{number}", "conversations": [
            {"images": [name], "user": f"Question {number} about the page?", "assistant": f"Answer {number}"}]})
    records.insert(5, {"id": "missing", "conversations": [{"images": ["absent.png"], "user": "Hi", "assistant": "x"}]})
    records.insert(17, {"id": "text", "conversations": [{"user": "No image here, just text.", "assistant": "Fine"}]})
    path = folder / "pages.jsonl"
    write_lines(path, records)
    return path


@pytest.mark.parametrize("orientation", [6, 8])
def test_rotated_jpeg_header_size_gives_the_decoded_token_count(tmp_path, tiny_processor, orientation):
    """Orientations 5-8 swap width and height for a viewer; loading applies no EXIF rotation, nor does the header."""
    path = write_rotated_jpeg(tmp_path / "rotated.jpg", orientation=orientation)
    _, _, decoded_tokens = tiny_processor.process_images([load_image(path)])
    assert image_size(path) == (120, 40)
    assert tiny_processor.image_token_count(*image_size(path)) == decoded_tokens[0]
    assert tiny_processor.image_token_count(40, 120) != decoded_tokens[0]  # so a swap would be caught


def test_the_check_reads_each_header_once_decodes_nothing_and_gives_the_encoded_lengths(tmp_path, tiny_processor,
                                                                                       monkeypatch):
    data = write_pages(tmp_path)
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path).name) or real_open(path, *a, **k))
    decoded: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image) or real_load(image))
    checked = check_dataset(data, tiny_processor, max_length=4096, skip_invalid=True)
    assert sorted(opened) == ["rotated.jpg", "tall.jpg", "wide.png"] and decoded == []
    assert (checked.skipped, checked.skip_reasons) == (1, {"invalid": 1})
    encoded = ConversationDataset(data, tiny_processor, indices=checked.indices)
    assert checked.lengths == [len(encoded[i]) for i in range(len(encoded))]


def _check_on_rank(data: str, model_dir: str, rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from phivision.processing.processor import Phi3VProcessor
    from phivision.train import run

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    timeouts = []
    real_init = dist.init_process_group
    dist.init_process_group = lambda *a, **k: timeouts.append(k.get("timeout")) or real_init(*a, **k)
    measured = []
    real_length = dataset_module.sample_length
    dataset_module.sample_length = lambda sample, *a, **k: measured.append(sample.id) or real_length(sample, *a, **k)
    config = load_config(None, base=base_config(model_dir, Path(data).parent, Path(data).parent / "out",
                                                train_data=data, skip_invalid=True, max_length=4096,
                                                ddp_timeout=1234))
    try:
        checked = run.checked_data(config, Phi3VProcessor.from_pretrained(model_dir), data, None)
        results[rank] = (checked, measured, [t.total_seconds() for t in timeouts])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_each_check_half_and_both_get_the_one_process_result(tmp_path, tiny_model_dir, tiny_processor):
    data = write_pages(tmp_path)
    alone = check_dataset(data, tiny_processor, max_length=4096, skip_invalid=True)
    results = run_on_two_processes(functools.partial(_check_on_rank, str(data), str(tiny_model_dir)))
    (first, first_ids, first_timeout), (second, second_ids, second_timeout) = results[0], results[1]
    assert first == second == alone
    assert len(first_ids) == len(second_ids) == 13 and not set(first_ids) & set(second_ids)
    assert first_timeout == second_timeout == [1234.0]


def test_ddp_timeout_reaches_the_trainer_and_must_be_positive(tmp_path, tiny_model_dir):
    from phivision.train.run import training_arguments

    config = load_config(None, ["ddp_timeout=7200"], base=base_config(tiny_model_dir, tmp_path, tmp_path / "o"))
    assert training_arguments(config, 1).ddp_timeout == 7200
    assert load_config(None, base=base_config(tiny_model_dir, tmp_path, tmp_path / "o")).ddp_timeout == 1800
    with pytest.raises(ConfigError, match="ddp_timeout must be at least 1"):
        load_config(None, ["ddp_timeout=0"], base=base_config(tiny_model_dir, tmp_path, tmp_path / "o"))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_truncated_after_its_header_stops_training_with_one_line(tmp_path, tiny_model_dir, digits, workers,
                                                                          capfd):
    """It passes the header check; the first step that loads it fails with the sample's file:line."""
    lines = (digits / "small_train.jsonl").read_text().splitlines()[:8]
    record = json.loads(lines[3])
    broken = tmp_path / "images" / "broken.jpg"
    broken.parent.mkdir()
    write_rotated_jpeg(broken, 200, 200)
    broken.write_bytes(broken.read_bytes()[:3000])
    assert image_size(broken) == (200, 200)
    record["conversations"][0]["images"] = [str(broken)]
    lines[3] = json.dumps(record)
    data = tmp_path / "small_train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    values = base_config(tiny_model_dir, tmp_path, tmp_path / "run", train_image_root=str(digits / "images"),
                         max_steps=2, save_steps=100, dataloader_workers=workers)
    completed = phivision_in_process(capfd, "train", str(write_yaml(tmp_path / "c.yaml", values)))
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    errors = [line.split("phivision train: error: ", 1)[1] for line in completed.stderr.splitlines()
              if "phivision train: error: " in line]  # the progress bar shares the line
    assert len(errors) == 1 and errors[0].startswith(
        f"{data}:4: image {broken} cannot be decoded (image file is truncated"), completed.stderr[-3000:]
    assert not (tmp_path / "run" / "model").exists()
