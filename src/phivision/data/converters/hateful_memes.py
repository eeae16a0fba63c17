"""Hateful Memes (Facebook AI): is a meme hateful, from its image and its overlaid text.

Layout: `SRC/img/*.png` and JSON-lines files `SRC/{train,dev_seen,test_seen,...}.jsonl` (every
`SRC/*.jsonl` is a split named after its file) with lines `{"id", "img": "img/42953.png", "label",
"text"}`. The prompt quotes the meme's text because the model may not read all of it in the image:
`Is this meme hateful? The meme's text reads: "{text}"` and, on the next line, `Answer yes or no.`
Record ids are the dataset's ids; lines without a label (the first release's test.jsonl) are left
out and counted as unlabeled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phivision.data.converters.common import (
    Failures,
    progress,
    publish_sample_image,
    read_json_lines,
    record,
    require_field,
    write_splits,
    yes_no,
    yes_no_question,
)
from phivision.errors import PhivisionError

SOURCE = "hateful_memes"
QUESTION = "Is this meme hateful? The meme's text reads:"


def convert_hateful_memes(src: Path, out: Path, *, strict: bool = False) -> dict[str, Any]:
    """Write `OUT/hateful_memes_{split}.jsonl` and the memes under `OUT/images/hateful_memes/img/`."""
    src, out = Path(src), Path(out)
    annotation_files = sorted(src.glob("*.jsonl"))
    if not annotation_files or not (src / "img").is_dir():
        raise PhivisionError(
            f"{src} is not a Hateful Memes folder; expected SRC/img/*.png and "
            "SRC/{train,dev_seen,test_seen}.jsonl with lines like "
            '{"id": 42953, "img": "img/42953.png", "label": 0, "text": "..."}'
        )
    failures = Failures(strict)
    records_by_split: dict[str, list[dict[str, Any]]] = {}
    unlabeled = 0
    for path in annotation_files:
        records = records_by_split.setdefault(path.stem, [])
        for line_number, item in progress(read_json_lines(path), f"{SOURCE} {path.stem}"):
            where = f"{path}:{line_number}"
            meme_id = require_field(item, "id", where)
            image = require_field(item, "img", where)
            text = require_field(item, "text", where)
            if item.get("label") is None:
                unlabeled += 1
                continue
            answer = yes_no(item["label"], where)
            relative = f"{SOURCE}/{image}"
            if publish_sample_image(src / image, out / "images" / relative, where, failures):
                records.append(record(str(meme_id), SOURCE, [relative], yes_no_question(QUESTION, text), answer))
    return {**write_splits(out, SOURCE, records_by_split), "unlabeled": unlabeled, "failed": failures.count}
