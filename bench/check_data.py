"""Seconds for the up-front data check at DocVQA scale, and to the first training step.

    PYTHONPATH=src python bench/check_data.py [--samples 40000] [--pages 10000] [--keep DIR]

Writes `--pages` page images of 1700x2200 (half JPEG, half PNG: a few drawn pages, each copied
to many files so every path is distinct) and `--samples` questions about them, consecutive
questions on one page as in DocVQA, into a temporary folder; then times `check_dataset`, full
decoding of a few pages (what the check did before, per page), and a one-step run of a tiny
random model from the start of `run_training` to the end of its first step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

PAGE_SIZE = (1700, 2200)
DRAWN_PAGES = 8


def draw_page(seed: int) -> Image.Image:
    """White page, dark lines of "text" and a grey table: compresses like a scanned document."""
    page = Image.new("RGB", PAGE_SIZE, "white")
    pen = ImageDraw.Draw(page)
    for row in range(60):
        top = 120 + row * 32
        width = 600 + (seed * 97 + row * 131) % 900
        for left in range(150, 150 + width, 40):
            pen.rectangle((left, top, left + 28 + (left + row + seed) % 9, top + 14), fill=(30, 30, 30))
    pen.rectangle((150, 1800, 1550, 2100), outline=(90, 90, 90), width=3)
    return page


def write_dataset(folder: Path, samples: int, pages: int) -> Path:
    images = folder / "images"
    images.mkdir(parents=True)
    drawn = []
    for index in range(DRAWN_PAGES):
        suffix = "jpg" if index % 2 == 0 else "png"
        path = folder / f"drawn{index}.{suffix}"
        draw_page(index).save(path, quality=85)  # PNG ignores quality
        drawn.append(path)
    names = []
    for index in range(pages):
        source = drawn[index % DRAWN_PAGES]
        name = f"page{index:05d}{source.suffix}"
        shutil.copyfile(source, images / name)
        names.append(name)
    with (folder / "train.jsonl").open("w") as out:
        for index in range(samples):
            page = names[index * pages // samples]
            out.write(json.dumps({"id": f"q{index}", "conversations": [
                {"images": [page], "user": f"What is the total in row {index % 17}?", "assistant": str(index)}]}) + "\n")
    return folder / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40_000)
    parser.add_argument("--pages", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, default=None, help="write the data here and keep it")
    args = parser.parse_args()

    from transformers import TrainerCallback

    from phivision.data.dataset import check_dataset
    from phivision.processing.folder import write_random_model
    from phivision.processing.images import load_image
    from phivision.processing.processor import Phi3VProcessor
    from phivision.train.config import load_config
    from phivision.train.run import run_training

    folder = args.keep or Path(tempfile.mkdtemp(prefix="phivision-check-bench-"))
    try:
        start = time.perf_counter()
        data = write_dataset(folder, args.samples, args.pages)
        print(f"wrote {args.pages} pages and {args.samples} samples in {time.perf_counter() - start:.1f} s")
        model_dir = write_random_model(folder / "model", preset="tiny", num_crops=4)
        processor = Phi3VProcessor.from_pretrained(model_dir)

        start = time.perf_counter()
        checked = check_dataset(data, processor, max_length=8192)
        check_seconds = time.perf_counter() - start
        print(f"check_dataset: {len(checked.indices)} samples over {args.pages} pages in {check_seconds:.1f} s")

        decoded = sorted((folder / "images").iterdir())[:20]
        start = time.perf_counter()
        for path in decoded:
            load_image(path)
        per_page = (time.perf_counter() - start) / len(decoded)
        print(f"full decoding: {per_page * 1000:.0f} ms a page; decoding every image of every sample "
              f"(the check before) would take about {per_page * args.samples:.0f} s")

        class FirstStep(TrainerCallback):
            seconds: float | None = None

            def on_step_end(self, args, state, control, **kwargs):
                if self.seconds is None:
                    self.seconds = time.perf_counter() - launched

        first_step = FirstStep()
        config = load_config(None, base={
            "model": str(model_dir), "train_data": str(data), "output_dir": str(folder / "run"), "method": "full",
            "num_crops": 4, "global_batch_size": 1, "per_device_batch_size": 1, "max_steps": 1, "save_steps": 10,
            "warmup_steps": 0, "dataloader_workers": 0, "learning_rate": 1e-3,
        })
        launched = time.perf_counter()
        run_training(config, callbacks=[first_step])
        print(f"run_training to the end of the first step (tiny model, includes the check): {first_step.seconds:.1f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
