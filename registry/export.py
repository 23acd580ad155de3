"""A registered version out of the registry: its base with its delta applied, as a diffusers folder or as one
safetensors file in the original layout (esd.single_file), for the tools that serve models outside the platform."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from esd import delta as delta_lib
from registry.load import version_files
from registry.store import RegistryError, Store

FORMATS = ("diffusers", "single-file")


def _write_folder(base: Path, delta: delta_lib.Delta | None, folder: Path) -> str:
    """Copy the base's diffusers folder to FOLDER, the UNet with the delta applied (saved in the base's storage
    dtype); returns the UNet's sha256 (esd.delta.unet_sha256)."""
    from diffusers import UNet2DConditionModel

    from esd.models import storage_dtype

    # Plain copies: the cache's files are read-only hard links of its blobs, not for handing out.
    shutil.copytree(base, folder, copy_function=shutil.copyfile)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=storage_dtype(folder),
                                                use_safetensors=True, local_files_only=True)
    if delta is not None:
        delta_lib.apply(unet, delta, base_sha256=delta.manifest["base_sha256"])
        for old in (folder / "unet").glob("*.safetensors*"):
            old.unlink()
        unet.save_pretrained(folder / "unet", safe_serialization=True)
    return delta_lib.unet_sha256(unet)


def export_version(store: Store, name: str, version: int | str, out: str | Path, fmt: str = "diffusers") -> dict:
    """Write NAME's VERSION to OUT, a path that must not exist yet: a diffusers folder ("diffusers") or one
    safetensors file ("single-file"). Every file is checked against the registry on the way; on failure nothing is
    left at OUT. Returns {path, format, arch, sha256 (of the file; of the UNet for a folder), unet_sha256}."""
    from esd import single_file

    out = Path(out)
    if fmt not in FORMATS:
        raise RegistryError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if out.exists() or out.is_symlink():
        raise RegistryError(f"{out} already exists; export writes to a new path")
    if not out.parent.is_dir():
        raise RegistryError(f"{out.parent} is not a directory")
    base, delta = version_files(store, f"{name}/{version}")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        folder = Path(tmp) / "model"
        unet_sha256 = _write_folder(base, delta, folder)
        arch = single_file.infer_arch(folder)
        if fmt == "diffusers":
            folder.rename(out)
            sha256 = unet_sha256
        else:
            sha256 = single_file.export(folder, out, arch)
    return {"path": str(out), "format": fmt, "arch": arch, "sha256": sha256, "unet_sha256": unet_sha256}
