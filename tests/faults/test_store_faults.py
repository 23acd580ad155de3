"""Faults in the stores under a registration or a load: S3 and MLflow killed at the worst moments. The servers
are real; the tests choose the moment by wrapping the call that comes just before it.

Each fault hits the platform's own registration step (flows.tasks.register_candidate, as a takedown runs it),
which fails; the servers come back; the step is retried, as Prefect retries it; then the audit."""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid

import pytest
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

import registry
from flows.platform import Platform
from flows.requests import Request
from infra import stack as stack_lib
from tests.conftest import environ
from tests.faults.conftest import audit
from tests.registry.deltas import make_delta

REPORT = {"efficacy": 1.0, "preservation": 1.0, "per_concept": {"circle": {"rate": 0.0}}, "grids": {}}


@pytest.fixture
def line(stack, tiny_sd, tmp_path):
    """A fresh base line in production, a request for it running, and the delta its takedown made."""
    with environ(stack.to_env()):
        platform = Platform(stack)
        name = f"fault-{uuid.uuid4().hex[:6]}"
        registry.import_base(platform.store, tiny_sd, name)
        registry.promote(platform.store, name, 1, "live", "ops")
        req, _ = platform.requests.file(Request("circle", "object", name, request_id=f"req-{name}").validate())
        platform.requests.start(req.request_id, None)
        delta_dir = make_delta(tiny_sd, tmp_path / "d", ["circle"], seed=3, request_ids=[req.request_id])
        yield platform, name, req, delta_dir


def kill(stack, service: str) -> None:
    os.killpg(stack_lib.running_pid(stack, service), signal.SIGKILL)


def register(platform, name, req, delta_dir) -> int:
    from flows.tasks import register_candidate

    return register_candidate.fn(name, str(delta_dir), [req.request_id], REPORT, req.run_id)


def fail_then_retry(stack, line, monkeypatch, ledger, fault: str) -> dict:
    """Run the registration with the fault armed (it must fail), bring every server back, retry: one version,
    whole, its evaluation logged once; then audit."""
    platform, name, req, delta_dir = line
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")     # fail now, not after minutes of retries
    try:
        with pytest.raises(Exception):
            register(platform, name, req, delta_dir)
    finally:
        monkeypatch.undo()
        stack_lib.up(stack, stack_lib.REGISTRY)                    # the servers back, on the same data
    assert [r["version"] for r in registry.list_versions(platform.store, name)] in ([1], [1, 2])
    version = register(platform, name, req, delta_dir)
    assert register(platform, name, req, delta_dir) == version == 2            # retried again: the same version
    client = platform.store.mlflow()
    assert client.get_model_version(name, "2").tags["esd.evaluation_logged"] == "true"
    assert len(client.get_metric_history(req.run_id, "efficacy")) == 1
    platform.requests.update(req.request_id, "candidate", model_version=version)
    return ledger.record(fault, audit(platform, name, [req.request_id]))


def clean(row: dict) -> None:
    assert (row["lost"], row["half_made"], row["wrong_aliases"]) == (0, 0, 0), row


def test_mlflow_killed_between_upload_and_registration(stack, line, monkeypatch, ledger):
    import registry.versions

    original = registry.versions.verify_stored

    def verified_then_kill(*args, **kwargs):
        manifest = original(*args, **kwargs)
        kill(stack, "mlflow")            # the files are in S3 and verified; the version is never created
        return manifest

    monkeypatch.setattr(registry.versions, "verify_stored", verified_then_kill)
    clean(fail_then_retry(stack, line, monkeypatch, ledger, "MLflow killed between upload and registration"))


def test_mlflow_killed_during_cleanup(stack, line, monkeypatch, ledger):
    import registry.versions

    original_discard, original_verify = registry.versions._discard, registry.versions.verify_stored

    def upload_broken(*args, **kwargs):
        raise registry.IntegrityError("an upload did not match its checksum")

    def kill_then_discard(*args, **kwargs):
        kill(stack, "mlflow")            # cleanup cannot ask MLflow which versions point at the objects
        return original_discard(*args, **kwargs)

    monkeypatch.setattr(registry.versions, "verify_stored", upload_broken)
    monkeypatch.setattr(registry.versions, "_discard", kill_then_discard)
    clean(fail_then_retry(stack, line, monkeypatch, ledger, "MLflow killed during cleanup of a failed upload"))
    assert registry.versions.verify_stored is original_verify


def test_s3_killed_mid_upload(stack, line, monkeypatch, ledger):
    original, uploaded = HttpArtifactRepository.log_artifact, []

    def upload_then_kill_s3(self, local_file, artifact_path=None):
        original(self, local_file, artifact_path)
        uploaded.append(local_file)
        if len(uploaded) == 2:           # two files are in S3, the rest of the upload meets a dead store
            kill(stack, "seaweedfs")

    monkeypatch.setattr(HttpArtifactRepository, "log_artifact", upload_then_kill_s3)
    clean(fail_then_retry(stack, line, monkeypatch, ledger, "SeaweedFS killed mid-upload"))
    assert len(uploaded) >= 2


def test_s3_killed_mid_download(stack, line, monkeypatch, ledger, tmp_path):
    import registry.store
    from esd import delta as delta_lib
    from registry.load import load

    platform, name, req, delta_dir = line
    register(platform, name, req, delta_dir)
    store = dataclasses.replace(platform.store, cache_dir=tmp_path / "cache")       # nothing cached yet
    original, downloads = registry.store._download, []

    def download_then_kill_s3(*args, **kwargs):
        got = original(*args, **kwargs)
        downloads.append(got)
        if len(downloads) == 2:
            kill(stack, "seaweedfs")
        return got

    monkeypatch.setattr(registry.store, "_download", download_then_kill_s3)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        with pytest.raises(Exception):
            load(store, f"{name}/2")
    finally:
        monkeypatch.undo()
        stack_lib.up(stack, stack_lib.REGISTRY)
    assert len(downloads) == 2 and not list((tmp_path / "cache" / "trees").iterdir())   # no half tree
    pipe = load(store, f"{name}/2")
    expected = load(platform.store, f"{name}/1")
    delta_lib.apply(expected.unet, delta_lib.load(delta_dir))
    assert delta_lib.unet_sha256(pipe.unet) == delta_lib.unet_sha256(expected.unet)
    platform.requests.update(req.request_id, "candidate", model_version=2)
    clean(ledger.record("SeaweedFS killed mid-download", audit(platform, name, [req.request_id])))
