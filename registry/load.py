"""A registered version as a runnable pipeline: the base, plus the version's one delta, every file verified."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from esd import delta as delta_lib
from esd.models import load_pipeline
from registry.store import VERSION_FILE, WEIGHTS, Store, fetch, verify_local
from registry.versions import resolve


def load(store: Store, ref: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """'models:/toy-sd@production', 'toy-sd/3', ... -> StableDiffusionPipeline. Refuses files that fail sha256."""
    mv = resolve(store, ref)
    tree = fetch(store.tracking_uri, store.cache_dir, mv.source, (mv.tags or {}).get("esd.manifest_sha256", ""))
    return pipeline_from_dir(tree, store.tracking_uri, store.cache_dir, dtype, device, verify=False)


def pipeline_from_dir(folder: Path, tracking_uri: str, cache_dir: Path, dtype: torch.dtype = torch.float32,
                      device: str = "cpu", verify: bool = True):
    """Build the pipeline of one version from its local directory (esd-version.json + weights/)."""
    manifest = json.loads((folder / VERSION_FILE).read_text())
    if verify:
        verify_local(folder / WEIGHTS, manifest)
    if manifest["kind"] == "base":
        return load_pipeline(folder / WEIGHTS, dtype, device)
    base = manifest["base"]
    base_tree = fetch(tracking_uri, cache_dir, base["source"], base["manifest_sha256"])
    pipe = load_pipeline(base_tree / WEIGHTS, dtype, device)
    # The base's files were verified against the manifest that records its UNet's sha256, so pass that
    # rather than hashing the whole UNet again (which, in fp16/bf16, would not even reproduce the fp32 hash).
    delta_lib.apply(pipe.unet, delta_lib.load(folder / WEIGHTS), base_sha256=base["unet_sha256"])
    return pipe


def default_cache_dir() -> Path:
    """The cache where no Store is at hand (inside `mlflow models serve`): the same place as infra's default."""
    return Path(os.environ.get("ESD_HOME", Path.cwd() / ".esd")) / "cache"


def generate(pipe, prompts: list[str], seed: int = 0, num_inference_steps: int = 25,
             guidance_scale: float = 7.5) -> np.ndarray:
    """Prompts -> uint8 images (N, H, W, 3); one generator seeded once, so the same call gives the same images."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        out = pipe(list(prompts), num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
                   generator=generator, output_type="np")
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
