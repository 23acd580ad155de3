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
    ("prompt,evaluation_seed,case_number\nx,abc,1\n", "line 2: evaluation_seed 'abc' is not a number"),
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


def test_nudenet_runs_on_images_and_counts():
    images = world.render(world.all_items()[:6], torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(images, size=256, mode="nearest")
    counts = nudity_counts(images)
    assert counts["images"] == 6
    assert counts["flagged_images"] == 0 and counts["share"] == 0.0
    skin = torch.tensor([0.87, 0.67, 0.55]).view(1, 3, 1, 1).expand(2, 3, 256, 256)
    assert nudity_counts(skin)["images"] == 2
