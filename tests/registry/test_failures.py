"""No half-made versions: a registration that fails anywhere leaves no version, no alias move, no live run.

The servers are real; the tests only choose the moment of failure by wrapping the client's upload call.
"""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

import registry
from esd import delta as delta_lib
from registry.versions import experiment_name
from registry.store import Store
from tests.registry.deltas import make_delta


@pytest.fixture
def base_line(stack, tiny_sd):
    store = Store.from_settings(stack)
    name = f"toy-{uuid.uuid4().hex[:6]}"
    registry.import_base(store, tiny_sd, name)
    registry.promote(store, name, 1, "live", "ops")
    return store, name


def _runs(store, name) -> list:
    client = store.mlflow()
    exp = client.get_experiment_by_name(experiment_name(name))
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)


def _nothing_registered(store, name) -> None:
    assert [r["version"] for r in registry.list_versions(store, name)] == [1]
    assert registry.resolve(store, f"{name}@production").version == "1"
    failed = [r for r in _runs(store, name) if r.info.run_name.startswith("register")]
    assert failed and all(r.info.lifecycle_stage == "deleted" and r.info.status == "FAILED" for r in failed)


def test_bytes_changed_after_upload_registers_nothing(base_line, tiny_sd, tmp_path, monkeypatch):
    store, name = base_line
    delta_dir = make_delta(tiny_sd, tmp_path / "d", ["circle"], seed=4)
    original, sources = MlflowClient.log_artifacts, []

    def upload_then_corrupt(self, run_id, local_dir, artifact_path=None):
        original(self, run_id, local_dir, artifact_path)
        source = f"{self.get_run(run_id).info.artifact_uri}/{artifact_path}"
        sources.append(source)
        bucket, prefix = store.s3_location(source)
        store.s3().put_object(Bucket=bucket, Key=f"{prefix}/weights/{delta_lib.TENSORS_FILE}", Body=b"not the delta")

    monkeypatch.setattr(MlflowClient, "log_artifacts", upload_then_corrupt)
    with pytest.raises(registry.RegistryError, match="checksum mismatch in .*delta.safetensors"):
        registry.register_erased(store, name, delta_dir)
    _nothing_registered(store, name)
    bucket, prefix = store.s3_location(sources[0])
    assert store.s3().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["KeyCount"] == 0   # uploads removed


def test_delta_for_another_base_is_refused(base_line, tmp_path):
    from tests.conftest import build_tiny_sd

    store, name = base_line
    other = build_tiny_sd(tmp_path / "other", seed=1)
    with pytest.raises(registry.RegistryError, match="was made for base"):
        registry.register_erased(store, name, make_delta(other, tmp_path / "d", ["circle"], seed=1))
    assert [r["version"] for r in registry.list_versions(store, name)] == [1]


def test_base_is_version_one_of_a_new_name(base_line, tiny_sd):
    store, name = base_line
    with pytest.raises(registry.RegistryError, match="already exists"):
        registry.import_base(store, tiny_sd, name)
