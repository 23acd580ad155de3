"""A second tiny random Stable Diffusion (another seed): a base that deltas of the first must not fit."""

import pytest

from tests.conftest import build_tiny_sd


@pytest.fixture(scope="session")
def other_tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-other"), seed=1)
