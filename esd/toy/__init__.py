"""The toy world: a Stable Diffusion small enough to train and judge on two CPU cores."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BASE_DIR = ASSETS / "base"
JUDGE_DIR = ASSETS / "judge"
