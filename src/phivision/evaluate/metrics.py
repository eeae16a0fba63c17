"""Answer metrics as the official Phi-3 cookbook computes them: ANLS for DocVQA, exact match otherwise.

Both sides are normalised with `.strip().strip('.').lower()` before comparing: models often add a
final period or change case, and the DocVQA evaluation is case-insensitive. ANLS scores a
prediction against each reference with 1 - lev(a, b) / max(len(a), len(b)), counts 0 when that
normalised distance reaches the threshold (0.5), and keeps the best reference. An empty prediction
therefore scores 0 (as in the cookbook) unless the reference is empty too, which scores 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from phivision.errors import PhivisionError

OTHER_LABEL = "<other>"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")


def normalize(text: str) -> str:
    return text.strip().strip(".").lower()


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete or substitute one character) turning a into b.

    Myers' bit-parallel algorithm (Hyyro's form for edit distance): one column of the dynamic
    programming table is held as bits of Python integers, so a pair costs O(len(b)) integer
    operations instead of O(len(a) * len(b)) interpreted steps.
    """
    if not a or not b:
        return len(a) + len(b)
    positions: dict[str, int] = {}
    for bit, char in enumerate(a):
        positions[char] = positions.get(char, 0) | (1 << bit)
    mask = (1 << len(a)) - 1
    top = 1 << (len(a) - 1)
    plus, minus, distance = mask, 0, len(a)
    for char in b:
        equal = positions.get(char, 0)
        vertical = equal | minus
        horizontal = (((equal & plus) + plus) ^ plus) | equal
        horizontal_plus = minus | ~(horizontal | plus)
        horizontal_minus = plus & horizontal
        if horizontal_plus & top:
            distance += 1
        elif horizontal_minus & top:
            distance -= 1
        horizontal_plus = (horizontal_plus << 1) | 1
        horizontal_minus <<= 1
        plus = (horizontal_minus | ~(vertical | horizontal_plus)) & mask
        minus = horizontal_plus & vertical & mask
    return distance


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Best normalised Levenshtein similarity to any reference, 0 at or past the threshold."""
    prediction = normalize(prediction)
    best = 0.0
    for reference in references:
        reference = normalize(reference)
        longest = max(len(prediction), len(reference))
        if longest == 0:
            return 1.0
        distance = levenshtein(prediction, reference) / longest
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


def mean_anls(predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = 0.5) -> float:
    """The dataset's ANLS: the mean of `anls` over samples (0 for none)."""
    _check_lengths(predictions, references)
    return float(np.mean([anls(p, r, threshold) for p, r in zip(predictions, references)])) if predictions else 0.0


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both sides are equal after `strip().strip('.').lower()`, as the official recipe scores."""
    return float(normalize(prediction) == normalize(reference))


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The mean of `exact_match` over samples (0 for none)."""
    _check_lengths(predictions, references)
    return float(np.mean([exact_match(p, r) for p, r in zip(predictions, references)])) if predictions else 0.0


def pick_metric(samples_answers: Iterable[Sequence[str] | None]) -> Literal["anls", "accuracy"]:
    """The `auto` metric: ANLS once any sample carries an `answers` list of reference answers.

    The list exists for free-text answers with several accepted spellings (DocVQA); classification
    data carries only its one label in the assistant turn and is scored by exact match.
    """
    return "anls" if any(answers is not None for answers in samples_answers) else "accuracy"


def per_class_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Accuracy per reference label (as first written), with the normalisation of `exact_match`."""
    labels, matrix = confusion_matrix(predictions, references)
    totals = matrix.sum(axis=1)
    return {label: float(matrix[i, i] / totals[i]) for i, label in enumerate(labels) if totals[i]}


def number_value(label: str) -> float | None:
    """The number a label names (`7`, `2.5`, `seven`), or None."""
    text = normalize(label)
    if text in NUMBER_WORDS:
        return float(NUMBER_WORDS.index(text))
    try:
        return float(text)
    except ValueError:
        return None


def natural_order(labels: list[str]) -> list[str]:
    """Numbers (digits or number words) in numeric order; any other labels as they first appear in the data."""
    values = [number_value(label) for label in labels]
    if None in values:
        return list(labels)
    return [label for _, label in sorted(zip(values, labels), key=lambda pair: pair[0])]


def confusion_matrix(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(labels, counts[reference, prediction]) over the reference labels in their natural order.

    Predictions matching no reference label fall in a last `<other>` column, added only when
    needed; its row is all zeros, which keeps the matrix square for plotting.
    """
    _check_lengths(predictions, references)
    spelling: dict[str, str] = {}
    for reference in references:
        spelling.setdefault(normalize(reference), reference)
    labels = natural_order(list(spelling.values()))
    index = {normalize(label): i for i, label in enumerate(labels)}
    predicted = [index.get(normalize(prediction), len(labels)) for prediction in predictions]
    if len(labels) in predicted:
        labels.append(OTHER_LABEL)
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for row, column in zip((index[normalize(reference)] for reference in references), predicted):
        matrix[row, column] += 1
    return labels, matrix


def format_confusion_matrix(labels: Sequence[str], matrix: np.ndarray) -> str:
    """A text table, rows are references and columns predictions, for logs and terminals."""
    corner = "reference \\ predicted"
    first_width = max([len(corner), *map(len, labels)])
    widths = [max(len(label), len(str(int(matrix[:, i].max(initial=0))))) for i, label in enumerate(labels)]
    header = "  ".join([corner.ljust(first_width), *(label.rjust(w) for label, w in zip(labels, widths))])
    rows = [
        "  ".join([label.ljust(first_width), *(str(int(count)).rjust(w) for count, w in zip(matrix[i], widths))])
        for i, label in enumerate(labels)
    ]
    return "\n".join([header, *rows])


def plot_confusion_matrix(labels: Sequence[str], matrix: np.ndarray, path: str | Path) -> Path:
    """A PNG heat map with counts; drawn on a bare Figure so no global pyplot backend is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = max(4.0, 0.5 * len(labels) + 2)
    figure = Figure(figsize=(size, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=90)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("reference")
    threshold = matrix.max(initial=0) / 2
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise PhivisionError(f"{len(predictions)} predictions for {len(references)} references; pass one per sample")
