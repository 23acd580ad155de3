"""Where the registry lives (an MLflow server and the S3 bucket behind it) and how its bytes are checked.

Every version is an MLflow model directory in its run's artifacts:

    model/MLmodel, pyfunc_model.py, requirements.txt, ...   the pyfunc wrapper (models-from-code, no pickle)
    model/esd-version.json                                   the version manifest: kind, base, sha256 of every file
    model/weights/...                                        a full diffusers folder (base) or a delta (erased)

The manifest's own sha256 is a model version tag (esd.manifest_sha256) in the registry database, so the chain
database -> manifest -> every file is checked end to end. Two readers, on purpose:
- consumers load through the MLflow server (`fetch`), so anything with a tracking URI can load a version;
  files are verified and cached locally by sha256;
- the registry audits the bucket itself with boto3 (`verify_stored`) before a version becomes visible and
  before an alias moves, streaming each object without writing it to disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from esd.delta import file_sha256
from infra import s3
from infra.settings import Settings

VERSION_FILE = "esd-version.json"
WEIGHTS = "weights"
FORMAT = "esd-version/1"


class RegistryError(RuntimeError):
    """Anything the registry refuses or cannot do; the message is one line that says what and why."""


class IntegrityError(RegistryError):
    """Stored bytes that do not match their recorded sha256."""


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    s3_endpoint: str | None
    s3_keys: tuple[str, str] | None
    artifacts_destination: str      # the MLflow server's --artifacts-destination, s3://bucket/prefix
    cache_dir: Path
    s3_region: str = "us-east-1"

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Store":
        """The registry that the settings point at. MLflow's client reads its credentials from the environment."""
        os.environ.update(settings.mlflow_env())
        return cls(tracking_uri=settings.tracking_uri, s3_endpoint=settings.s3_url, s3_keys=settings.s3_keys(),
                   s3_region=settings.s3_region, artifacts_destination=settings.artifacts_destination,
                   cache_dir=settings.cache_dir)

    def s3(self):
        return s3.client(self.s3_endpoint, self.s3_region, self.s3_keys)

    def s3_location(self, uri: str) -> tuple[str, str]:
        """(bucket, key) of an artifact URI. The MLflow server stores mlflow-artifacts:/X at <destination>/X."""
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            return parsed.netloc, parsed.path.lstrip("/")
        if parsed.scheme == "mlflow-artifacts":
            dest = urlparse(self.artifacts_destination)
            return dest.netloc, f"{dest.path.strip('/')}/{parsed.path.lstrip('/')}".lstrip("/")
        raise RegistryError(f"cannot map artifact URI {uri} to S3 (expected mlflow-artifacts:/ or s3://)")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stored_sha256(s3, bucket: str, key: str) -> str:
    h = hashlib.sha256()
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in iter(lambda: body.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _mismatch(what: str, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(f"checksum mismatch in {what}: expected sha256 {expected[:12]}, found {actual[:12]}")


def _require(manifest_sha256: str, source: str) -> None:
    if not manifest_sha256:
        raise RegistryError(f"{source} has no recorded manifest checksum (esd.manifest_sha256): not an esd version")


def manifest_files(manifest: dict, where: str, key: str = "files") -> dict[str, dict]:
    """A manifest's weight files (KEY "files", relative to weights/) or model files ("model_files": MLmodel, the
    pyfunc code, requirements; relative to the model directory), each path checked to stay inside the version:
    relative, no '..', no backslash."""
    files = manifest.get(key) if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise IntegrityError(f"manifest of {where} lists no {key.replace('_', ' ')}")
    for rel in files:
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or "\\" in rel or ".." in parts or ":" in rel:
            raise IntegrityError(f"manifest of {where} names {rel!r}, a path outside the version")
    return files


def manifest_entries(manifest: dict, where: str) -> dict[str, dict]:
    """Every file of a version but the manifest itself, by its path in the model directory."""
    entries = {f"{WEIGHTS}/{rel}": meta for rel, meta in manifest_files(manifest, where).items()}
    model = manifest_files(manifest, where, "model_files")
    if VERSION_FILE in model or any(rel.startswith(f"{WEIGHTS}/") for rel in model):
        raise IntegrityError(f"manifest of {where} lists its own files twice")
    return entries | model


def model_dir_files(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file of a model directory but the manifest and weights/ (what model_files lists)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != VERSION_FILE and not rel.startswith(f"{WEIGHTS}/") and "__pycache__" not in p.parts:
            out[rel] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    return out


def verify_stored(store: Store, source: str, manifest_sha256: str) -> dict:
    """Read a version's manifest and every file it lists straight from S3; raise IntegrityError on any mismatch."""
    from botocore.exceptions import ClientError

    _require(manifest_sha256, source)
    s3 = store.s3()
    bucket, prefix = store.s3_location(source)
    try:
        raw = s3.get_object(Bucket=bucket, Key=f"{prefix}/{VERSION_FILE}")["Body"].read()
        if sha256_bytes(raw) != manifest_sha256:
            raise _mismatch(f"{source}/{VERSION_FILE}", manifest_sha256, sha256_bytes(raw))
        manifest = json.loads(raw)
        entries = manifest_entries(manifest, source)
        for rel, meta in entries.items():
            actual = _stored_sha256(s3, bucket, f"{prefix}/{rel}")
            if actual != meta["sha256"]:
                raise _mismatch(f"{source}/{rel}", meta["sha256"], actual)
        # ... and nothing else is stored there: a file the manifest does not cover would be served unchecked
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix.rstrip("/")) + 1:]
                if rel != VERSION_FILE and rel not in entries:
                    raise IntegrityError(f"{source}/{rel} is stored but not in the version's manifest")
    except ClientError as exc:
        raise IntegrityError(f"cannot read stored file under {source}: {exc.response['Error'].get('Code')}") from None
    return manifest


def delete_stored(store: Store, uri: str) -> None:
    """Delete every object under an artifact URI (used to remove a failed upload)."""
    s3 = store.s3()
    bucket, prefix = store.s3_location(uri)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def _download(tracking_uri: str, uri: str, dst: Path) -> Path:
    import mlflow.artifacts

    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri))


def fetch(tracking_uri: str, cache_dir: Path, source: str, manifest_sha256: str) -> Path:
    """A local copy of a version (esd-version.json + weights/), downloaded through MLflow, every file verified.

    Files are cached by sha256 under cache_dir/blobs and shared between versions (the base is downloaded once);
    a version's tree is hard links into the blobs, named by its manifest's sha256. A cached file was verified
    when it entered the cache, so a later load does not download or hash it again.
    """
    _require(manifest_sha256, source)
    tree = cache_dir / "trees" / manifest_sha256
    if tree.is_dir():
        return tree
    blobs = cache_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (cache_dir / "trees").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        staging = Path(tmp) / "tree"
        manifest_path = _download(tracking_uri, f"{source}/{VERSION_FILE}", Path(tmp) / "m")
        raw = manifest_path.read_bytes()
        if sha256_bytes(raw) != manifest_sha256:
            raise _mismatch(f"{source}/{VERSION_FILE}", manifest_sha256, sha256_bytes(raw))
        staging.mkdir()
        (staging / VERSION_FILE).write_bytes(raw)
        manifest = json.loads(raw)
        for rel, meta in manifest_files(manifest, source, "model_files").items():
            got = _download(tracking_uri, f"{source}/{rel}", Path(tmp) / "model")
            if file_sha256(got) != meta["sha256"]:
                raise _mismatch(f"{source}/{rel}", meta["sha256"], file_sha256(got))
        for rel, meta in manifest_files(manifest, source).items():
            blob = blobs / meta["sha256"]
            if not blob.exists():
                got = _download(tracking_uri, f"{source}/{WEIGHTS}/{rel}", Path(tmp) / "dl")
                actual = file_sha256(got)
                if actual != meta["sha256"]:
                    raise _mismatch(f"{source}/{WEIGHTS}/{rel}", meta["sha256"], actual)
                got.chmod(0o400)     # read-only blobs, shared by hard links, readable by their owner only
                os.replace(got, blob)
            target = staging / WEIGHTS / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(blob, target)
        try:
            os.rename(staging, tree)   # atomic: a tree is either complete or absent
        except OSError:
            if not tree.is_dir():
                raise
            shutil.rmtree(staging)     # another process finished the same tree first
    return tree


# Written into a downloaded model directory by MLflow's loader itself (models:/ URIs), never stored with a version.
LOADER_FILES = {"registered_model_meta"}


def verify_local(folder: Path, manifest: dict) -> None:
    """Check a local model directory (esd-version.json, the pyfunc files, weights/) against its manifest: every
    listed file present with its sha256, and no other file (the pyfunc path, where MLflow did the download)."""
    entries = manifest_entries(manifest, str(folder))
    for rel, meta in entries.items():
        path = folder / rel
        if not path.is_file() or path.is_symlink():
            raise IntegrityError(f"missing file {path}")
        actual = file_sha256(path)
        if actual != meta["sha256"]:
            raise _mismatch(str(path), meta["sha256"], actual)
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if (p.is_file() and rel != VERSION_FILE and rel not in entries and rel not in LOADER_FILES
                and "__pycache__" not in p.parts):
            raise IntegrityError(f"{p} is not in the version's manifest")


