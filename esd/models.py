"""Load a Stable Diffusion 1.x / 2.x pipeline from a local diffusers folder, offline, safetensors only."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()

REQUIRED = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json"]
WEIGHTS = ["unet", "vae", "text_encoder"]


class ModelError(ValueError):
    """A model folder that cannot be loaded; the message names what is wrong in one line."""


def check_folder(path: str | Path) -> Path:
    """Raise ModelError naming the first missing part of a diffusers Stable Diffusion folder."""
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"model folder not found: {root}")
    for rel in REQUIRED:
        if not (root / rel).is_file():
            raise ModelError(f"model folder {root} is missing {rel}")
    for part in WEIGHTS:
        if not any((root / part).glob("*.safetensors")):
            raise ModelError(f"model folder {root} has no safetensors weights in {part}/")
    tok = root / "tokenizer"
    if not ((tok / "vocab.json").is_file() or (tok / "tokenizer.json").is_file()):
        raise ModelError(f"model folder {root} is missing tokenizer/vocab.json or tokenizer/tokenizer.json")
    return root


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with a DDIM scheduler, loaded from local files only."""
    root = check_folder(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            root, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model folder {root}: {first}") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
