"""Load a Stable Diffusion 1.x / 2.x pipeline from a local diffusers folder, offline, safetensors only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from infra.errors import first_line

# Every load is local_files_only: the engine never reaches a hub, whatever HF_HUB_OFFLINE says.
diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()
# Loading a local folder takes a second; the libraries' loading bars would only bury our own progress.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

REQUIRED = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json"]
WEIGHTS = ["unet", "vae", "text_encoder"]
# What the UNet predicts: the noise (SD 1.x, SD 2.x base) or the velocity v (SD 2.x 768-v); the engine converts
# both to noise where its maths needs it.
PREDICTION_TYPES = ("epsilon", "v_prediction")


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
    prediction = json.loads((root / "scheduler/scheduler_config.json").read_text()).get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelError(f"model folder {root} predicts {prediction!r} (scheduler prediction_type); "
                         f"supported: {', '.join(PREDICTION_TYPES)}")
    tok = root / "tokenizer"
    if not ((tok / "vocab.json").is_file() or (tok / "tokenizer.json").is_file()):
        raise ModelError(f"model folder {root} is missing tokenizer/vocab.json or tokenizer/tokenizer.json")
    return root


SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def storage_dtype(path: str | Path, part: str = "unet") -> torch.dtype | None:
    """The floating dtype a model folder stores PART's weights in (read from the safetensors headers), or None."""
    counts: dict[str, int] = {}
    for f in sorted((Path(path) / part).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__" and info["dtype"] in SAFETENSORS_DTYPES:
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return SAFETENSORS_DTYPES[max(counts, key=counts.get)] if counts else None


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with a DDIM scheduler, loaded from local files only."""
    root = check_folder(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            root, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model folder {root}: {first_line(exc)}") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def prediction_type(pipe) -> str:
    """What the pipeline's UNet predicts (refusing a type the engine does not handle)."""
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelError(f"the model predicts {prediction!r}; supported: {', '.join(PREDICTION_TYPES)}")
    return prediction


def as_noise(out: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The UNet's output at x_t as a noise prediction: eps itself, or from v = sqrt(a) eps - sqrt(1 - a) x0,
    eps = sqrt(a) v + sqrt(1 - a) x_t (a = alpha_bar at t)."""
    if prediction == "epsilon":
        return out
    return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * x


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
