"""The checkpoint of an erasure: only the UNet parameters that changed, as safetensors, plus a JSON manifest.

A delta holds the full new values (not differences) of every UNet tensor that differs from its base, in the
base's storage dtype, so `apply(base, delta)` reproduces the erased UNet bit for bit. On disk the tensors are
one standard safetensors file, gzip-compressed (`gunzip -S .gzip delta.safetensors.gzip` gives it back); the
compression is deterministic, so the same delta always has the same bytes and sha256.

Erasures stack: a delta made on top of an earlier version is taken against the original base and so carries
the earlier changes too; loading any version is always base + one delta. The manifest names the base by the
sha256 of its UNet weights, and a delta is refused on any other base. No pickle anywhere.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes, save as save_bytes

from infra.errors import first_line

FORMAT = "esd-delta/2"
# Not ".gz": servers label a .gz download Content-Encoding gzip and HTTP clients then unpack it on the way,
# so the file fetched through MLflow's artifact proxy would not be the file whose sha256 was recorded.
TENSORS_FILE = "delta.safetensors.gzip"
MANIFEST_FILE = "manifest.json"


class DeltaError(ValueError):
    """A delta that does not fit its base or does not match its manifest."""


@dataclass
class Delta:
    tensors: dict[str, torch.Tensor]
    manifest: dict = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and values of a state dict, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def unet_sha256(unet: torch.nn.Module) -> str:
    """The identity of a base: the sha256 of its UNet weights, taken in float32 so the storage dtype does not matter."""
    return state_sha256({k: v.float() for k, v in unet.state_dict().items()})


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def diff(base_state: dict[str, torch.Tensor], new_state: dict[str, torch.Tensor], manifest: dict,
         dtype: torch.dtype | None = None) -> Delta:
    """The delta from base to new: every tensor whose value changed, stored as its new value (in `dtype`, when
    given: the base's storage dtype, to which the new values must already be rounded)."""
    changed = {k: v.detach().to("cpu", dtype or v.dtype).clone().contiguous() for k, v in new_state.items()
               if not torch.equal(v.to(base_state[k].dtype).cpu(), base_state[k].cpu())}
    delta = Delta(changed, dict(manifest))
    delta.manifest.update(format=FORMAT, parameters=delta.num_parameters, bytes=delta.num_bytes,
                          tensors_sha256=state_sha256(changed), library_versions=library_versions())
    return delta


def check_base(delta: Delta, base_sha256: str) -> None:
    """Refuse a delta made for another base."""
    expected = delta.manifest.get("base_sha256")
    if expected != base_sha256:
        raise DeltaError(f"delta was made for base {str(expected)[:12]}, this base is {base_sha256[:12]}")


def apply(unet: torch.nn.Module, delta: Delta, base_sha256: str | None = None) -> torch.nn.Module:
    """Load the delta's tensors into a base UNet in place; refuse a delta made for another base."""
    check_base(delta, base_sha256 or unet_sha256(unet))
    own = unet.state_dict()
    for name, t in delta.tensors.items():
        if name not in own:
            raise DeltaError(f"delta names a parameter the base UNet does not have: {name}")
        if own[name].shape != t.shape:
            raise DeltaError(f"delta shape {tuple(t.shape)} does not fit {name} {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, t in delta.tensors.items():
            own[name].copy_(t.to(own[name].dtype))
    return unet


def save(delta: Delta, folder: str | Path) -> dict[str, Path]:
    """Write delta.safetensors.gzip and manifest.json into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = folder / TENSORS_FILE
    tensors.write_bytes(gzip.compress(save_bytes(delta.tensors, metadata={"format": FORMAT}), 9, mtime=0))
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps(delta.manifest, indent=2, sort_keys=True))
    return {"tensors": tensors, "manifest": manifest}


def load(folder: str | Path) -> Delta:
    """Read a delta and check its tensors against the manifest's checksum."""
    folder = Path(folder)
    for name in (TENSORS_FILE, MANIFEST_FILE):
        if not (folder / name).is_file():
            raise DeltaError(f"delta folder {folder} is missing {name}")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    try:
        tensors = load_bytes(gzip.decompress((folder / TENSORS_FILE).read_bytes()))
    except (OSError, EOFError, ValueError, RuntimeError) as exc:
        raise DeltaError(f"delta tensors in {folder} are unreadable: {first_line(exc)}") from None
    if state_sha256(tensors) != manifest.get("tensors_sha256"):
        raise DeltaError(f"delta tensors in {folder} do not match their manifest checksum")
    return Delta(tensors, manifest)
