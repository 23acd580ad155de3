"""Load a Stable Diffusion 1.x / 2.x / XL pipeline from a local diffusers folder, offline, safetensors only, and
condition its UNet on prompts the way the pipeline itself does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
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
# The pipelines the engine understands, by model_index.json's _class_name; SDXL adds a second text encoder
# (CLIP ViT-bigG, whose pooled embedding and the image size ids condition the UNet beside the tokens).
PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline, "StableDiffusionXLPipeline": StableDiffusionXLPipeline}
XL_PARTS = ["text_encoder_2"]
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
    xl = pipeline_class(root) is StableDiffusionXLPipeline
    for part in WEIGHTS + (XL_PARTS if xl else []):
        if not (root / part / "config.json").is_file():
            raise ModelError(f"model folder {root} is missing {part}/config.json")
        if not any((root / part).glob("*.safetensors")):
            raise ModelError(f"model folder {root} has no safetensors weights in {part}/")
    prediction = json.loads((root / "scheduler/scheduler_config.json").read_text()).get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ModelError(f"model folder {root} predicts {prediction!r} (scheduler prediction_type); "
                         f"supported: {', '.join(PREDICTION_TYPES)}")
    for tok in [root / "tokenizer"] + ([root / "tokenizer_2"] if xl else []):
        if not ((tok / "vocab.json").is_file() or (tok / "tokenizer.json").is_file()):
            raise ModelError(f"model folder {root} is missing {tok.name}/vocab.json or {tok.name}/tokenizer.json")
    return root


def pipeline_class(root: Path):
    """The pipeline class model_index.json names, if the engine understands it."""
    try:
        name = json.loads((root / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise ModelError(f"model folder {root} has an unreadable model_index.json") from None
    if name not in PIPELINES:
        raise ModelError(f"model folder {root} is a {name}; supported: {', '.join(PIPELINES)}")
    return PIPELINES[name]


def is_xl(pipe) -> bool:
    return isinstance(pipe, StableDiffusionXLPipeline)


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


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline with a DDIM scheduler, loaded from local files only."""
    root = check_folder(path)
    cls = pipeline_class(root)
    extra = ({"add_watermarker": False} if cls is StableDiffusionXLPipeline else
             {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
    try:
        pipe = cls.from_pretrained(root, dtype=dtype, local_files_only=True, use_safetensors=True, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model folder {root}: {first_line(exc)}") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass(frozen=True)
class Cond:
    """What the UNet is conditioned on for a batch of prompts: the token embeddings (N, 77, D) and, for SDXL, the
    pooled embedding of the second text encoder and the size/crop ids (original size, crop corner, target size)."""
    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, i: int | slice) -> "Cond":
        """Row i as a batch of one (or a slice of rows)."""
        pick = slice(i, i + 1) if isinstance(i, int) else i
        return Cond(*(None if v is None else v[pick] for v in (self.hidden, self.pooled, self.time_ids)))

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        parts = zip(*((c.hidden, c.pooled, c.time_ids) for c in conds))
        return Cond(*(None if v[0] is None else torch.cat(v) for v in parts))

    def repeat(self, n: int) -> "Cond":
        """A batch of one repeated n times."""
        return Cond(*(None if v is None else v.expand(n, *v.shape[1:]) for v in (self.hidden, self.pooled,
                                                                                  self.time_ids)))

    def kwargs(self) -> dict:
        """The UNet's keyword arguments for this conditioning."""
        if self.pooled is None:
            return {"encoder_hidden_states": self.hidden}
        return {"encoder_hidden_states": self.hidden,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}}


@torch.no_grad()
def conditioning(pipe, prompts: list[str]) -> Cond:
    """The UNet's conditioning for each prompt, from the pipeline's own tokenizers and text encoders. SDXL as its
    pipeline samples: an empty prompt is all zeros where the model asks for it (force_zeros_for_empty_prompt), the
    size ids those of a square image at the UNet's native size, no crop."""
    device = pipe.unet.device
    if not is_xl(pipe):
        return Cond(pipe.encode_prompt(prompts, device, 1, False)[0])
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    if pipe.config.get("force_zeros_for_empty_prompt", True):
        empty = torch.tensor([p == "" for p in prompts], device=device)
        hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(prompts), dtype=hidden.dtype, device=device)
    return Cond(hidden, pooled, time_ids)


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
