"""DocVQA: questions about document images, from the official annotations or a parquet export.

* Official: `SRC/{split}_v1.0.json` (any `SRC/*.json`; the split is the file name up to its first
  `_`) holding `{"data": [{"questionId", "question", "image": "documents/x.png", "answers"}]}`,
  images under `SRC/documents/`. Record ids are the questionIds, which the leaderboard uses.
* Parquet (the layout of HuggingFaceM4/the_cauldron's docvqa): `SRC/{split}-*.parquet` with an
  `images` column (lists of `{bytes, path}` structs or of bytes) and a `texts` column (lists of
  `{user, assistant}`); one record per text, with id `{split}-{row:08d}-{text index}`.

Every record carries all reference answers in a top-level `answers` list for ANLS evaluation;
questions without answers (the official test split) are left out and counted as unlabeled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phivision.data.converters.common import (
    Failures,
    progress,
    publish_sample_image,
    read_json,
    record,
    require_field,
    write_splits,
)
from phivision.errors import PhivisionError

SOURCE = "docvqa"
INSTRUCTION = "Answer briefly."
LAYOUTS = (
    "expected the official annotations SRC/{train,val,test}_v1.0.json with images in SRC/documents/, "
    "or parquet files SRC/{split}-*.parquet with `images` and `texts` columns"
)


def convert_docvqa(src: Path, out: Path, *, strict: bool = False) -> dict[str, Any]:
    """Write `OUT/docvqa_{split}.jsonl` and the document images under `OUT/images/docvqa/`."""
    src, out = Path(src), Path(out)
    annotations = sorted(src.glob("*.json"))
    parquets = sorted(src.glob("*.parquet"))
    if annotations and parquets:
        raise PhivisionError(f"{src} holds both .json annotations and .parquet files; point SRC at one of them")
    if not annotations and not parquets:
        raise PhivisionError(f"{src} is not a DocVQA folder; {LAYOUTS}")
    failures = Failures(strict)
    if annotations:
        records_by_split, unlabeled = _from_annotations(src, annotations, out, failures)
    else:
        records_by_split, unlabeled = _from_parquet(parquets, out, failures)
    return {**write_splits(out, SOURCE, records_by_split), "unlabeled": unlabeled, "failed": failures.count}


def question_prompt(question: str) -> str:
    """The user text: the question and the instruction to answer briefly, once."""
    question = question.strip()
    return question if question.endswith(INSTRUCTION) else f"{question}\n{INSTRUCTION}"


def _from_annotations(
    src: Path, files: list[Path], out: Path, failures: Failures
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    records_by_split: dict[str, list[dict[str, Any]]] = {}
    split_files: dict[str, Path] = {}
    unlabeled = 0
    for path in files:
        split = path.stem.split("_")[0]
        if split in split_files:
            raise PhivisionError(f"{split_files[split]} and {path} both hold split {split!r}; keep one of them")
        split_files[split] = path
        records = records_by_split.setdefault(split, [])
        for index, item in enumerate(progress(_annotation_entries(path), f"{SOURCE} {split}")):
            where = f"{path}, data[{index}]"
            question_id = require_field(item, "questionId", where)
            question = require_field(item, "question", where)
            image = require_field(item, "image", where)
            answers = item.get("answers") or []
            if not answers:
                unlabeled += 1
                continue
            relative = f"{SOURCE}/{image}"
            if publish_sample_image(src / image, out / "images" / relative, where, failures):
                records.append(
                    record(str(question_id), SOURCE, [relative], question_prompt(question), answers[0], answers=answers)
                )
    return records_by_split, unlabeled


def _annotation_entries(path: Path) -> list[dict[str, Any]]:
    payload = read_json(path)
    entries = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise PhivisionError(f'{path}: expected {{"data": [{{"questionId", "question", "image", "answers"}}, ...]}}')
    return entries


def _from_parquet(files: list[Path], out: Path, failures: Failures) -> tuple[dict[str, list[dict[str, Any]]], int]:
    records_by_split: dict[str, list[dict[str, Any]]] = {}
    rows_by_split: dict[str, int] = {}
    unlabeled = 0
    for path in files:
        split = path.stem.split("-")[0]
        records = records_by_split.setdefault(split, [])
        row = rows_by_split.get(split, 0)
        for images, texts in progress(_parquet_rows(path), f"{SOURCE} {split}"):
            where = f"{path}, row {row}"
            relatives = _write_row_images(images, out / "images", f"{SOURCE}/{split}/{row:08d}", where, failures)
            for text_index, text in enumerate(texts if relatives is not None else []):
                answer = text.get("assistant")
                if not answer:
                    unlabeled += 1
                    continue
                record_id = f"{split}-{row:08d}-{text_index}"
                prompt = question_prompt(require_field(text, "user", where))
                records.append(record(record_id, SOURCE, relatives, prompt, answer, answers=[answer]))
            row += 1
        rows_by_split[split] = row
    return records_by_split, unlabeled


def _parquet_rows(path: Path) -> Iterator[tuple[list[Any], list[dict[str, Any]]]]:
    """(images, texts) per row, read in batches so a large file never sits in memory whole."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise PhivisionError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        parquet_file = parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises several unrelated types for a damaged file
        raise PhivisionError(f"{path} cannot be read as parquet ({error}); re-download it") from None
    columns = set(parquet_file.schema_arrow.names)
    if not {"images", "texts"} <= columns:
        raise PhivisionError(f"{path} has columns {sorted(columns)}; {LAYOUTS}")
    for batch in parquet_file.iter_batches(batch_size=64, columns=["images", "texts"]):
        for row in batch.to_pylist():
            yield row["images"] or [], row["texts"] or []


def _write_row_images(
    images: list[Any], root: Path, stem: str, where: str, failures: Failures
) -> list[str] | None:
    """Write a row's encoded images as `{stem}-{j}.{format}`; None (failure recorded) if one is unreadable."""
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    relatives = []
    for index, image in enumerate(images):
        data = image.get("bytes") if isinstance(image, dict) else image
        try:
            with Image.open(BytesIO(data or b"")) as decoded:
                suffix = "jpg" if decoded.format == "JPEG" else decoded.format.lower()
        except (UnidentifiedImageError, OSError) as error:
            failures.add(f"{where}: image {index} cannot be decoded ({error})")
            return None
        relative = f"{stem}-{index}.{suffix}"
        destination = root / relative
        if not destination.is_file() or destination.stat().st_size != len(data):
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(data)
        relatives.append(relative)
    return relatives
