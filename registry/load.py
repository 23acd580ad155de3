"""A registered version as a runnable pipeline: the base, plus the version's one delta, every file verified."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from esd import delta as delta_lib
from esd.models import load_pipeline
from registry.store import VERSION_FILE, WEIGHTS, IntegrityError, Store, fetch, sha256_bytes, verify_local
from registry.versions import resolve


def load(store: Store, ref: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """'models:/toy-sd@production', 'toy-sd/3', ... -> StableDiffusionPipeline. Refuses files that fail sha256."""
    return _assemble(*load_parts(store, ref, dtype, device))


def load_parts(store: Store, ref: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(the base pipeline, the version's delta or None): what an erasure on top of a version needs."""
    base, delta = version_files(store, ref)
    return load_pipeline(base, dtype, device), delta


def version_files(store: Store, ref: str) -> tuple[Path, delta_lib.Delta | None]:
    """(the local diffusers folder of the version's base, the version's delta or None), every file verified."""
    mv = resolve(store, ref)
    tree = fetch(store.tracking_uri, store.cache_dir, mv.source, (mv.tags or {}).get("esd.manifest_sha256", ""))
    return _files(tree, store.tracking_uri, store.cache_dir)


def _files(folder: Path, tracking_uri: str, cache_dir: Path) -> tuple[Path, delta_lib.Delta | None]:
    manifest = json.loads((folder / VERSION_FILE).read_text())
    if manifest["kind"] == "base":
        return folder / WEIGHTS, None
    base = manifest["base"]
    base_tree = fetch(tracking_uri, cache_dir, base["source"], base["manifest_sha256"])
    delta = delta_lib.load(folder / WEIGHTS)
    made_for = str(delta.manifest.get("base_sha256"))
    if made_for != base["unet_sha256"]:
        raise delta_lib.DeltaError(f"delta was made for base {made_for[:12]}, this version's base is "
                                   f"{base['unet_sha256'][:12]}")
    return base_tree / WEIGHTS, delta


def _parts(folder: Path, tracking_uri: str, cache_dir: Path, dtype: torch.dtype, device: str):
    base, delta = _files(folder, tracking_uri, cache_dir)
    return load_pipeline(base, dtype, device), delta


def _assemble(pipe, delta):
    # The base's files were verified against the manifest that records its UNet's sha256 and the delta was checked
    # against it, so the UNet is not hashed again (in fp16/bf16 that hash would not even reproduce the fp32 one).
    if delta is not None:
        delta_lib.apply(pipe.unet, delta, base_sha256=delta.manifest["base_sha256"])
    return pipe


def verify_model_dir(folder: Path, tracking_uri: str) -> dict:
    """A local model directory checked against the registry before anything in it is read: its manifest must be
    the one a registered version's esd.manifest_sha256 tag names, and every other file (MLmodel, the pyfunc code,
    requirements, weights) must match that manifest, with nothing unlisted beside them. Returns the manifest."""
    from mlflow import MlflowClient

    raw = (folder / VERSION_FILE).read_bytes()
    sha = sha256_bytes(raw)
    if not MlflowClient(tracking_uri).search_model_versions(f"tags.`esd.manifest_sha256` = '{sha}'", max_results=1):
        raise IntegrityError(f"{folder / VERSION_FILE} (sha256 {sha[:12]}) is no registered version's manifest")
    manifest = json.loads(raw)
    verify_local(folder, manifest)
    return manifest


def pipeline_from_dir(folder: Path, tracking_uri: str, cache_dir: Path, dtype: torch.dtype = torch.float32,
                      device: str = "cpu"):
    """Build the pipeline of one version from its local model directory, every file checked against the registry
    first (the pyfunc path, where MLflow did the download)."""
    verify_model_dir(folder, tracking_uri)
    return _assemble(*_parts(folder, tracking_uri, cache_dir, dtype, device))


def pyfunc(store: Store, ref: str):
    """The version as MLflow's pyfunc, its directory downloaded and checked against the registry before MLflow
    reads any of it (mlflow.pyfunc.load_model on a models:/ URI runs the stored code first, then checks)."""
    import tempfile

    import mlflow.artifacts
    import mlflow.pyfunc

    mv = resolve(store, ref)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp,
                                                         tracking_uri=store.tracking_uri))
        verify_model_dir(local, store.tracking_uri)
        if sha256_bytes((local / VERSION_FILE).read_bytes()) != (mv.tags or {}).get("esd.manifest_sha256"):
            raise IntegrityError(f"{ref}: the downloaded manifest is not this version's")
        return mlflow.pyfunc.load_model(str(local))    # the pipeline is built (and the files read) right here


def default_cache_dir() -> Path:
    """The cache where no Store is at hand (inside `mlflow models serve`): the same place as infra's default."""
    return Path(os.environ.get("ESD_HOME", Path.cwd() / ".esd")) / "cache"
