"""Real-checkpoint evaluation parts that need no real weights: the I2P prompt file and NudeNet."""

import pytest
import torch

from esd.evaluate.real import PromptFileError, nudity_counts, read_prompt_csv
from esd.toy import world


def test_i2p_prompt_file_is_read(tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text('prompt,evaluation_seed,case_number,categories\n"a person, on a beach",42,7,sexual\nportrait,3.0,8,\n')
    rows = read_prompt_csv(path)
    assert [(r.prompt, r.seed, r.case) for r in rows] == [("a person, on a beach", 42, "7"), ("portrait", 3, "8")]


@pytest.mark.parametrize("content, message", [
    ("prompt,case_number\nx,1\n", "lacks column(s) evaluation_seed"),
    ("prompt,evaluation_seed,case_number\nx,abc,1\n", "line 2: evaluation_seed 'abc' is not a seed"),
    ("prompt,evaluation_seed,case_number\nx,inf,1\n", "line 2: evaluation_seed 'inf' is not a seed"),
    ("prompt,evaluation_seed,case_number\nx,-3,1\n", "line 2: evaluation_seed '-3' is not a seed"),
    ("prompt,evaluation_seed,case_number\n ,1,1\n", "line 2: empty prompt"),
    ("prompt,evaluation_seed,case_number\n", "has no prompts"),
])
def test_bad_prompt_file_gives_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompt_csv(path)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(PromptFileError, match="prompt file not found"):
        read_prompt_csv(tmp_path / "nope.csv")


def test_nudenet_finds_nothing_in_toy_renders():
    images = world.render(world.all_items()[:6], torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(images, size=256, mode="nearest")
    counts = nudity_counts(images)
    assert counts == {"images": 6, "flagged_images": 0, "share": 0.0, "per_class": {}}


class Detections:
    """NudeNet's `detect` contract (a list of {"class", "score", "box"} per RGBA image), with set answers."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def detect(self, rgba):
        self.seen.append(rgba.shape)
        return self.answers.pop(0)


def test_nudity_counts_exposed_classes_above_the_threshold_only():
    answers = [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 5, 5]},
                {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 5, 5]}],          # a face is not nudity
               [{"class": "BUTTOCKS_EXPOSED", "score": 0.2, "box": [0, 0, 5, 5]}],        # below the threshold
               [],
               [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 5, 5]},
                {"class": "MALE_GENITALIA_EXPOSED", "score": 0.8, "box": [0, 0, 5, 5]}]]
    detector = Detections(answers)
    counts = nudity_counts(torch.rand(4, 3, 64, 64), threshold=0.6, detector=detector)
    assert counts == {"images": 4, "flagged_images": 2, "share": 0.5,
                      "per_class": {"FEMALE_BREAST_EXPOSED": 2, "MALE_GENITALIA_EXPOSED": 1}}
    assert detector.seen == [(64, 64, 4)] * 4           # each image as H x W x RGBA uint8


def test_a_prompt_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,evaluation_seed,case_number\ncaf\xe9,1,1\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="is not UTF-8 text"):
        read_prompt_csv(path)
