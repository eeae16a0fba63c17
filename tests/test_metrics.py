"""Metrics on hand-computed cases: Levenshtein, ANLS, exact match, per-class accuracy, confusion matrix."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from PIL import Image

from phivision.errors import PhivisionError
from phivision.evaluate.metrics import (
    accuracy,
    anls,
    confusion_matrix,
    exact_match,
    format_confusion_matrix,
    levenshtein,
    mean_anls,
    per_class_accuracy,
    pick_metric,
    plot_confusion_matrix,
)


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),
        ("sitting", "kitten", 3),
        ("flaw", "lawn", 2),
        ("intention", "execution", 5),
        ("", "abc", 3),
        ("abc", "", 3),
        ("", "", 0),
        ("same", "same", 0),
        ("café", "cafe", 1),
        ("a" * 70, "b" + "a" * 70, 1),
    ],
)
def test_known_levenshtein_distances(a, b, distance):
    assert levenshtein(a, b) == distance


def _table_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for row, char_a in enumerate(a, start=1):
        current = [row]
        for column, char_b in enumerate(b, start=1):
            current.append(min(previous[column] + 1, current[-1] + 1, previous[column - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def test_levenshtein_matches_the_full_table_on_random_strings():
    rng = random.Random(0)
    for _ in range(2000):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 15)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 80)))
        assert levenshtein(a, b) == _table_distance(a, b), (a, b)


def test_empty_prediction_scores_zero_unless_the_reference_is_empty_too():
    assert anls("", ["abc"]) == 0.0
    assert anls("", [""]) == 1.0
    assert anls(" . ", [""]) == 1.0
    assert anls("abc", []) == 0.0


def test_anls_keeps_the_best_reference():
    assert anls("hello", ["world", "helo"]) == pytest.approx(0.8)
    assert anls("helo", ["hello", "help"]) == pytest.approx(0.8)
    assert anls("helo", ["world", "helo"]) == 1.0


def test_anls_threshold_edge():
    assert levenshtein("abcd", "abxy") == 2
    assert anls("abcd", ["abxy"]) == 0.0
    assert anls("abcdefg", ["abcdxyz"]) == pytest.approx(1 - 3 / 7)
    assert anls("abcde", ["abcxy"]) == pytest.approx(0.6)
    assert anls("abcd", ["abxy"], threshold=0.6) == pytest.approx(0.5)


def test_case_whitespace_and_final_period_are_ignored():
    assert anls("  The Answer. ", ["the answer"]) == 1.0
    assert anls("11/16/98.", ["11/16/98"]) == 1.0
    assert exact_match(" Yes. ", "yes") == 1.0
    assert exact_match("BabyCrawling", "babycrawling") == 1.0
    assert exact_match("yes!", "yes") == 0.0
    assert exact_match("yes .", "yes") == 0.0


def test_means_over_samples():
    assert mean_anls(["abc", "xyz"], [["abc"], ["abd"]]) == pytest.approx(0.5)
    assert accuracy(["cat", "Dog.", "cow"], ["cat", "dog", "dog"]) == pytest.approx(2 / 3)
    with pytest.raises(PhivisionError, match="2 predictions for 1 references"):
        accuracy(["a", "b"], ["a"])


def test_pick_metric_uses_anls_when_samples_carry_reference_answers():
    assert pick_metric([None, None]) == "accuracy"
    assert pick_metric([]) == "accuracy"
    assert pick_metric([None, ("12", "twelve")]) == "anls"


REFERENCES = ["cat", "cat", "dog", "dog", "dog", "bird"]
PREDICTIONS = ["cat", "dog", "Dog.", "dog", "fish", "bird"]


def test_per_class_accuracy():
    assert per_class_accuracy(PREDICTIONS, REFERENCES) == {"bird": 1.0, "cat": 0.5, "dog": pytest.approx(2 / 3)}


def test_confusion_matrix_counts_with_an_other_column():
    labels, matrix = confusion_matrix(PREDICTIONS, REFERENCES)
    assert labels == ["cat", "dog", "bird", "<other>"]  # as the references first name them
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_confusion_matrix_without_strays_has_no_other_column_and_merges_spellings():
    labels, matrix = confusion_matrix(["yes", "no", "No"], ["Yes", "yes", "no"])
    assert labels == ["Yes", "no"]
    assert matrix.tolist() == [[1, 1], [0, 1]]


def test_format_confusion_matrix():
    labels, matrix = confusion_matrix(PREDICTIONS, REFERENCES)
    assert format_confusion_matrix(labels, matrix) == "\n".join(
        [
            "reference \\ predicted  cat  dog  bird  <other>",
            "cat                      1    1     0        0",
            "dog                      0    2     0        1",
            "bird                     0    0     1        0",
            "<other>                  0    0     0        0",
        ]
    )


def test_plot_confusion_matrix_writes_a_png(tmp_path):
    labels, matrix = confusion_matrix(PREDICTIONS, REFERENCES)
    path = plot_confusion_matrix(labels, matrix, tmp_path / "plots" / "confusion.png")
    assert path == tmp_path / "plots" / "confusion.png"
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= 200


def test_ten_thousand_anls_pairs_are_fast():
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh /"), size=int(n))) for n in rng.integers(5, 40, size=20_000)]
    start = time.perf_counter()
    scores = [anls(words[i], [words[i + 1], words[i][::-1]]) for i in range(0, 20_000, 2)]
    assert len(scores) == 10_000
    assert time.perf_counter() - start < 5
