"""The before/after grid carries its labels: a title, "before"/"after" column titles and each row's prompt."""

from __future__ import annotations

import numpy as np
import torch

from esd import sample
from esd.evaluate import report as report_lib
from esd.evaluate.toy import Judged


def _ink(img, box) -> int:
    """Dark pixels (text) inside box (left, top, right, bottom) of a PIL image."""
    return int((np.asarray(img.crop(box).convert("L")) < 100).sum())


def test_labels_are_drawn_where_they_belong():
    rows = [torch.full((2, 3, 8, 8), 0.5) for _ in range(3)]
    plain = sample.grid(rows, scale=4)
    labelled = sample.grid(rows, scale=4, row_labels=["a red circle", "a blue square", "a green cross"],
                           col_labels=["before", "after"], title="circle")
    assert labelled.width > plain.width and labelled.height > plain.height
    left, top = labelled.width - plain.width, labelled.height - plain.height
    assert np.array_equal(np.asarray(labelled.crop((left, top, labelled.width, labelled.height))), np.asarray(plain))
    for i in range(3):      # each row's label is beside its row
        assert _ink(labelled, (0, top + i * plain.height // 3, left, top + (i + 1) * plain.height // 3)) > 20
    for j in range(2):      # each column's title is above its column
        assert _ink(labelled, (left + j * plain.width // 2, top - 20, left + (j + 1) * plain.width // 2, top)) > 20
    assert _ink(sample.grid(rows, scale=4, col_labels=["", ""]), (0, 0, plain.width, 20)) == 0


def test_before_after_grid_names_prompts_and_verdicts(tmp_path):
    images = torch.rand(4, 3, 32, 32)
    prompts = ["a red circle", "a blue circle", "a red square", "a green circle"]
    truth = {"shape": ["circle", "circle", "square", "circle"]}
    base = Judged(prompts, truth, {"shape": ["circle", "circle", "square", "circle"]}, images)
    cand = Judged(prompts, truth, {"shape": ["none", "circle", "square", "square"]}, images)
    path = report_lib.before_after_grid(base, cand, "circle", tmp_path)
    img = sample.Image.open(path)
    assert img.width > 2 * 34 * 4          # prompts to the left of the two columns
    from flows.report import markdown

    md = markdown("t", ["r"], "m", 2, {"grids": {"circle": str(path)}}, {"passed": True, "reasons": []}, "promoted",
                  {})
    assert "![circle: before and after" in md and "data:image/png;base64," in md
