"""Versions of a base line: import a base (version 1), register erased versions, and ask about them.

A registered model is one base line ("toy-sd"). Version 1 is the full base; every later version is base + one
delta (deltas stack, each carries all earlier changes). A version is registered only after its files are read
back from S3 and match their sha256, so a registered version never points at missing or broken files.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from esd import delta as delta_lib
from esd.models import check_folder
from infra.errors import first_line
from registry.store import (FORMAT, VERSION_FILE, WEIGHTS, RegistryError, Store, delete_stored, file_sha256,
                            model_dir_files,
                            verify_stored)

# Weight formats that unpickle on load are never uploaded: load uses safetensors only.
PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# The gate's verdict on a version, written by record_gate and read before production moves.
GATE_TAG = "esd.gate"
GATE_REASONS_TAG = "esd.gate_reasons"


def experiment_name(name: str) -> str:
    return f"registry/{name}"


# --- resolving references ------------------------------------------------------------------------------------

_REF = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def model_name(name: str) -> str:
    """A registered model name as the registry accepts it (it also goes into MLflow's search filters)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistryError(f"model name {name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a "
                            "letter or digit")
    return name


def resolve(store: Store, ref: str):
    """A ModelVersion from 'models:/NAME@alias', 'models:/NAME/3', 'NAME@alias' or 'NAME/3'."""
    from mlflow.exceptions import MlflowException

    m = _REF.match(ref.strip())
    if not m:
        raise RegistryError(f"not a model reference: {ref!r} (use NAME/VERSION or NAME@ALIAS)")
    model_name(m["name"])
    client = store.mlflow()
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        return client.get_model_version(m["name"], m["version"])
    except MlflowException as exc:
        raise RegistryError(f"no model version {ref}: {first_line(exc)}") from None


def _tags(mv) -> dict[str, str]:
    return dict(mv.tags or {})


def _json_tag(mv, key: str, default: Any) -> Any:
    value = _tags(mv).get(key)
    return json.loads(value) if value else default


def base_version(store: Store, name: str):
    for mv in _all_versions(store, name):
        if _tags(mv).get("esd.kind") == "base":
            return mv
    raise RegistryError(f"registered model {name} has no base version; import one with `esd base import`")


def _all_versions(store: Store, name: str) -> list:
    versions = store.mlflow().search_model_versions(f"name='{model_name(name)}'")
    return sorted(versions, key=lambda mv: int(mv.version))


# --- registering ---------------------------------------------------------------------------------------------

def _signature():
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),   # unnamed: predict takes a plain list of prompts
        outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("num_inference_steps", "long", 25),
                            ParamSpec("guidance_scale", "double", 7.5)]))


def _save_pyfunc(model_dir: Path) -> None:
    import mlflow.pyfunc

    # Requirements given explicitly: MLflow would otherwise infer them by loading the model in a subprocess.
    # Its advice to add an input example does not apply: the signature is explicit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(str(model_dir), python_model=str(PYFUNC_FILE), signature=_signature(),
                                 pip_requirements=pinned_requirements())


def pinned_requirements() -> list[str]:
    """The versions that made the model, pinned (esd-platform is this project, installed from its source)."""
    from importlib.metadata import version

    return [f"{d}=={version(d)}" for d in ("esd-platform", "mlflow", "torch", "diffusers", "transformers",
                                           "safetensors")]


def _register(store: Store, name: str, files: dict[str, Path], manifest: dict, tags: dict[str, str],
              run_id: str | None, run_name: str, params: dict[str, str], description: str) -> dict:
    """Upload one version into a run, verify it in S3, then create the model version; on failure leave nothing."""
    from mlflow.entities import Param

    client = store.mlflow()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        _save_pyfunc(model_dir)
        for rel, src in files.items():
            # Symlinks, not copies: a multi-GB base is read once, straight from where it lies, during upload.
            (model_dir / WEIGHTS / rel).parent.mkdir(parents=True, exist_ok=True)
            (model_dir / WEIGHTS / rel).symlink_to(Path(src).resolve())
        # The manifest covers every file of the version, the pyfunc's own (MLmodel, code, requirements) included
        manifest = manifest | {"model_files": model_dir_files(model_dir)}
        (model_dir / VERSION_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        manifest_sha256 = file_sha256(model_dir / VERSION_FILE)
        stored_bytes = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())

        own_run = run_id is None
        if own_run:
            exp = client.get_experiment_by_name(experiment_name(name))
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment_name(name))
            run_id = client.create_run(exp_id, run_name=run_name).info.run_id
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        try:
            if own_run and params:
                client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            client.log_artifacts(run_id, str(model_dir), "model")
            verify_stored(store, source, manifest_sha256)
            mv = client.create_model_version(
                name, source, run_id=run_id, description=description,
                tags=tags | {"esd.manifest_sha256": manifest_sha256, "esd.stored_bytes": str(stored_bytes)})
        except Exception as exc:
            _discard(store, name, source, run_id, own_run)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise RegistryError(f"registering a version of {name} failed, nothing was registered: {first}") from None
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    return show(store, name, mv.version)


def _discard(store: Store, name: str, source: str, run_id: str, own_run: bool) -> None:
    """Best effort: remove a version that may have been created, then the uploaded objects, then our run.

    The objects go only once MLflow has answered that no version points at them: with MLflow down they stay
    (unreferenced, removed later by `mlflow gc`), never leaving a version whose files are gone."""
    client = store.mlflow()
    try:
        for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            if mv.source == source:
                client.delete_model_version(name, mv.version)
        unreferenced = True             # every version on these objects answered and deleted
    except Exception:
        unreferenced = False
    for step in (lambda: unreferenced and delete_stored(store, source),
                 lambda: own_run and client.set_terminated(run_id, "FAILED"),
                 lambda: own_run and unreferenced and client.delete_run(run_id)):
        try:
            step()
        except Exception:
            pass   # e.g. S3 is down: the objects stay under a failed run, removed by `mlflow gc`


def _weight_files(folder: Path) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and p.suffix not in PICKLE_SUFFIXES:
            files[rel.as_posix()] = p
    return files


def import_base(store: Store, path: str | Path, name: str, description: str = "",
                source: str | Path | None = None) -> dict:
    """Register a full diffusers Stable Diffusion folder as version 1 of a new registered model. SOURCE names where
    the folder came from when it is a conversion (a single-file checkpoint); the run records it."""
    from diffusers import UNet2DConditionModel
    from mlflow.exceptions import MlflowException

    model_name(name)
    folder = check_folder(path)
    links = [p for p in [folder, *folder.rglob("*")] if p.is_symlink()]
    if links:
        raise RegistryError(f"refusing to import {folder}: {links[0]} is a symbolic link; import a folder of real files")
    client = store.mlflow()
    try:
        client.create_registered_model(name, description=description or f"base line {name}")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise RegistryError(f"cannot create registered model {name}: {first_line(exc)}") from None
        if _all_versions(store, name):
            raise RegistryError(f"registered model {name} already exists with versions; a base is version 1 of a new name")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    base_sha256 = delta_lib.unet_sha256(unet)
    del unet
    files = _weight_files(folder)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    manifest = {"format": FORMAT, "kind": "base", "base": None, "unet_sha256": base_sha256,
                "prediction_type": scheduler.get("prediction_type", "epsilon"),
                "files": {rel: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for rel, p in files.items()}}
    unet_bytes = sum(m["bytes"] for rel, m in manifest["files"].items()
                     if rel.startswith("unet/") and rel.endswith(".safetensors"))
    tags = {"esd.kind": "base", "esd.base_sha256": base_sha256, "esd.unet_bytes": str(unet_bytes)}
    try:
        origin = Path(source or folder).resolve()
        return _register(store, name, files, manifest, tags, None, f"import base {name}",
                         {"source_folder": str(origin)[:500]}, f"base imported from {origin.name}")
    except RegistryError:
        if not _all_versions(store, name):
            client.delete_registered_model(name)
        raise


def register_erased(store: Store, name: str, delta_dir: str | Path, run_id: str | None = None) -> dict:
    """Register a delta folder (delta.safetensors + manifest.json) as the next version of NAME.

    With run_id, the files are logged into that (e.g. the erasure's own) run; otherwise into a new run.
    """
    delta_dir = Path(delta_dir)
    d = delta_lib.load(delta_dir)       # also checks the tensors against the manifest's checksum
    m = d.manifest
    base = base_version(store, name)
    if m.get("base_sha256") != _tags(base).get("esd.base_sha256"):
        raise RegistryError(f"delta in {delta_dir} was made for base {str(m.get('base_sha256'))[:12]}, "
                            f"but {name}'s base (version {base.version}) is {_tags(base)['esd.base_sha256'][:12]}")
    parent = str(m["parent_version"]) if m.get("parent_version") is not None else str(base.version)
    resolve(store, f"{name}/{parent}")  # the parent must exist
    concepts = list(m.get("concepts", []))
    erased = sorted({c for step in m.get("erasures", []) for c in step.get("concepts", [])} | set(concepts))
    files = {n: delta_dir / n for n in (delta_lib.TENSORS_FILE, delta_lib.MANIFEST_FILE)}
    manifest = {"format": FORMAT, "kind": "erased",
                "base": {"source": base.source, "manifest_sha256": _tags(base)["esd.manifest_sha256"],
                         "unet_sha256": _tags(base)["esd.base_sha256"]},
                "files": {rel: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for rel, p in files.items()}}
    tags = {"esd.kind": "erased", "esd.concepts": json.dumps(concepts), "esd.erased": json.dumps(erased),
            "esd.request_ids": json.dumps(list(m.get("request_ids") or [])), "esd.method": str(m.get("method", "")),
            "esd.parent_version": parent, "esd.delta_sha256": manifest["files"][delta_lib.TENSORS_FILE]["sha256"],
            "esd.base_sha256": m["base_sha256"]}
    params = {"method": tags["esd.method"], "concepts": tags["esd.concepts"][:500], "parent_version": parent,
              "seed": str(m.get("seed")),
              **{f"hp.{k}": str(v)[:500] for k, v in (m.get("hyperparameters") or {}).items()}}
    return _register(store, name, files, manifest, tags, run_id, f"register {name} erase {', '.join(concepts)}",
                     params, f"{tags['esd.method']} erasing {', '.join(concepts)} on top of version {parent}")


# --- questions -----------------------------------------------------------------------------------------------

def _row(mv, aliases: dict[str, str]) -> dict:
    t = _tags(mv)
    return {"version": int(mv.version), "kind": t.get("esd.kind", "unknown"), "method": t.get("esd.method", ""),
            "concepts": _json_tag(mv, "esd.concepts", []), "erased": _json_tag(mv, "esd.erased", []),
            "request_ids": _json_tag(mv, "esd.request_ids", []),
            "parent_version": int(t["esd.parent_version"]) if t.get("esd.parent_version") else None,
            "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
            "stored_bytes": int(t.get("esd.stored_bytes", 0)), "created": mv.creation_timestamp,
            "uri": f"models:/{mv.name}/{mv.version}"}


def _aliases(store: Store, name: str) -> dict[str, str]:
    return dict(store.mlflow().get_registered_model(model_name(name)).aliases or {})


def list_versions(store: Store, name: str, erased: str | None = None) -> list[dict]:
    """Every version of NAME, oldest first; with `erased`, only versions in which that concept is erased."""
    aliases = _aliases(store, name)
    rows = [_row(mv, aliases) for mv in _all_versions(store, name)]
    if erased:
        rows = [r for r in rows if erased.casefold() in {c.casefold() for c in r["erased"]}]
    return rows


def show(store: Store, name: str, version: int | str) -> dict:
    """One version: its row plus source, run, checksums, and bytes stored against its base's full UNet."""
    mv = resolve(store, f"{name}/{version}")
    row = _row(mv, _aliases(store, name))
    t = _tags(mv)
    base = mv if t.get("esd.kind") == "base" else base_version(store, name)
    unet_bytes = int(_tags(base).get("esd.unet_bytes", 0))
    return row | {"name": name, "source": mv.source, "run_id": mv.run_id, "description": mv.description,
                  "base_sha256": t.get("esd.base_sha256"), "delta_sha256": t.get("esd.delta_sha256"),
                  "manifest_sha256": t.get("esd.manifest_sha256"), "gate": t.get(GATE_TAG),
                  "unet_bytes": unet_bytes,
                  "stored_fraction_of_unet": round(row["stored_bytes"] / unet_bytes, 6) if unet_bytes else None}


def lineage(store: Store, name: str, version: int | str) -> list[dict]:
    """The chain from VERSION back to the base, newest first; each step says what it erased."""
    aliases = _aliases(store, name)
    by_version = {int(mv.version): mv for mv in _all_versions(store, name)}
    chain, current = [], int(resolve(store, f"{name}/{version}").version)
    while current is not None:
        if current not in by_version or current in [r["version"] for r in chain]:
            raise RegistryError(f"broken lineage for {name} at version {current}")
        row = _row(by_version[current], aliases)
        chain.append(row)
        current = row["parent_version"] if row["kind"] != "base" else None
    return chain


def verify(store: Store, name: str, version: int | str) -> None:
    """Check a version's stored files, and its base's, in S3; raise IntegrityError naming the first bad file."""
    mv = resolve(store, f"{name}/{version}")
    manifest = verify_stored(store, mv.source, _tags(mv).get("esd.manifest_sha256", ""))
    if manifest.get("base"):
        verify_stored(store, manifest["base"]["source"], manifest["base"]["manifest_sha256"])


def record_gate(store: Store, name: str, version: int | str, passed: bool, reasons: list[str]) -> None:
    """Record the gate's verdict on a version; production takes an erased version only once it passed."""
    client = store.mlflow()
    client.set_model_version_tag(name, str(version), GATE_TAG, "passed" if passed else "failed")
    client.set_model_version_tag(name, str(version), GATE_REASONS_TAG, json.dumps(reasons)[:5000])

