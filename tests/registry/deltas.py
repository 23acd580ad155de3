"""Deltas made the way the engine makes them (esd.delta.diff), without training."""

from __future__ import annotations

from pathlib import Path

import torch

from esd import delta as delta_lib


def make_delta(base: Path, out: Path, concepts: list[str], *, seed: int, prior: Path | None = None,
               parent_version: int | None = None, method: str = "esd-x", request_ids: list[str] | None = None) -> Path:
    """Perturb every cross-attention (attn2) tensor of the base UNet, on top of `prior`'s changes (stacking),
    and save the delta against the original base."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True)
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    base_sha = delta_lib.unet_sha256(unet)
    erasures: list[dict] = []
    if prior is not None:
        earlier = delta_lib.load(prior)
        delta_lib.apply(unet, earlier)
        erasures = list(earlier.manifest["erasures"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    erasures.append({"concepts": concepts, "method": method})
    manifest = {"base_sha256": base_sha, "method": method, "concepts": concepts, "request_ids": request_ids or [],
                "parent_version": parent_version, "erasures": erasures, "hyperparameters": {"lr": 1e-5, "iterations": 0},
                "seed": seed}
    delta_lib.save(delta_lib.diff(base_state, unet.state_dict(), manifest), out)
    return out


def mark_gate(store, name: str, version: int, verdict: str = "passed") -> None:
    """Record an evaluation verdict on a version, as the takedown flow does before promoting."""
    from registry.versions import record_gate

    record_gate(store, name, version, verdict == "passed", [] if verdict == "passed" else ["held in a test"])
