"""NLVR2: is a sentence true of a pair of photographs.

Layout: JSON-lines `SRC/{train,dev,test1}.json` (every `SRC/*.json` is a split named after its
file) with lines `{"identifier": "dev-850-0-0", "sentence", "label": "True"}`. The images of
`dev-850-0-0` are `dev-850-0-img0.png` and `dev-850-0-img1.png` (the identifier without its last
part), anywhere under `SRC/images/{split}/` or `SRC/{split}/`: the train images sit in numbered
subfolders, so each split's folder is indexed once. The prompt:
`Is the following sentence true of the pair of images? "{sentence}"` and, on the next line,
`Answer yes or no.` Record ids are the identifiers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phivision.data.converters.common import (
    IMAGE_SUFFIXES,
    Failures,
    progress,
    publish_image,
    read_json_lines,
    record,
    require_field,
    write_splits,
    yes_no,
    yes_no_question,
)
from phivision.errors import PhivisionError

SOURCE = "nlvr2"
QUESTION = "Is the following sentence true of the pair of images?"


def convert_nlvr2(src: Path, out: Path, *, strict: bool = False) -> dict[str, Any]:
    """Write `OUT/nlvr2_{split}.jsonl` and the image pairs under `OUT/images/nlvr2/{split}/`."""
    src, out = Path(src), Path(out)
    annotation_files = sorted(src.glob("*.json"))
    if not annotation_files:
        raise PhivisionError(
            f"{src} is not an NLVR2 folder; expected SRC/{{train,dev,test1}}.json (JSON lines) with images "
            "in SRC/images/{split}/ or SRC/{split}/"
        )
    failures = Failures(strict)
    records_by_split: dict[str, list[dict[str, Any]]] = {}
    unlabeled = 0
    for path in annotation_files:
        split = path.stem
        folders = [folder for folder in (src / "images" / split, src / split) if folder.is_dir()]
        if not folders:
            failures.add(f"{path}: no image folder {src / 'images' / split} or {src / split}; split {split} left out")
            continue
        images = _image_index(folders)
        records = records_by_split.setdefault(split, [])
        for line_number, item in progress(read_json_lines(path), f"{SOURCE} {split}"):
            where = f"{path}:{line_number}"
            identifier = str(require_field(item, "identifier", where))
            sentence = require_field(item, "sentence", where)
            if item.get("label") is None:
                unlabeled += 1
                continue
            answer = yes_no(item["label"], where)
            pair_prefix = identifier.rsplit("-", 1)[0]
            pair = [images.get(f"{pair_prefix}-img{side}") for side in (0, 1)]
            missing = [f"{pair_prefix}-img{side}" for side, image in enumerate(pair) if image is None]
            if missing:
                searched = " or ".join(map(str, folders))
                failures.add(f"{where}: image {' and '.join(missing)} not found under {searched}")
                continue
            relatives = [f"{SOURCE}/{split}/{image.name}" for image in pair]
            for image, relative in zip(pair, relatives):
                publish_image(image, out / "images" / relative)
            records.append(record(identifier, SOURCE, relatives, yes_no_question(QUESTION, sentence), answer))
    return {**write_splits(out, SOURCE, records_by_split), "unlabeled": unlabeled, "failed": failures.count}


def _image_index(folders: list[Path]) -> dict[str, Path]:
    """File stem -> image path for every image below `folders`; the first in sorted order wins."""
    index: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(path.stem, path)
    return index
