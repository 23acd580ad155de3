"""Base, two stacked erasures, load, aliases, history, restart, corruption: on SQLite and on PostgreSQL."""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest
import torch

import registry
from registry.load import load as load_version
from esd import delta as delta_lib
from esd import sample
from esd.models import load_pipeline
from infra import stack as stack_lib
from infra.errors import ReasonRequired
from registry.store import Store
from tests.registry.deltas import make_delta, mark_gate


def generate(pipe, prompts: list[str], seed: int = 0, num_inference_steps: int = 2):
    """uint8 images as the served model gives them: image i from seed + i, default guidance."""
    seeds = [seed + i for i in range(len(prompts))]
    return sample.to_uint8(sample.generate(pipe, prompts, seeds, steps=num_inference_steps))


@pytest.fixture(scope="module")
def line(backend_stack, tiny_sd, deltas):
    """A registered model with v1 = tiny base, v2 = circle erased, v3 = Vela Moreau erased on top of v2."""
    store = Store.from_settings(backend_stack)
    name = f"toy-{uuid.uuid4().hex[:6]}"
    registry.import_base(store, tiny_sd, name)
    registry.register_erased(store, name, deltas["circle"])
    registry.register_erased(store, name, deltas["vela"])
    mark_gate(store, name, 2)
    mark_gate(store, name, 3)
    return {"name": name, "store": store, "settings": backend_stack}


def test_versions_tags_lineage_and_queries(line, deltas):
    store, name = line["store"], line["name"]
    rows = registry.list_versions(store, name)
    assert [(r["version"], r["kind"]) for r in rows] == [(1, "base"), (2, "erased"), (3, "erased")]
    v2 = store.mlflow().get_model_version(name, "2").tags
    assert v2["esd.concepts"] == '["circle"]' and v2["esd.method"] == "esd-x" and v2["esd.parent_version"] == "1"
    assert v2["esd.request_ids"] == '["req-circle"]'
    assert v2["esd.delta_sha256"] == delta_lib.file_sha256(deltas["circle"] / delta_lib.TENSORS_FILE)
    assert v2["esd.base_sha256"] == store.mlflow().get_model_version(name, "1").tags["esd.base_sha256"]

    chain = registry.lineage(store, name, 3)
    assert [(r["version"], r["concepts"]) for r in chain] == [(3, ["Vela Moreau"]), (2, ["circle"]), (1, [])]
    assert [r["version"] for r in registry.list_versions(store, name, erased="circle")] == [2, 3]
    assert [r["version"] for r in registry.list_versions(store, name, erased="vela moreau")] == [3]


def test_show_reports_stored_bytes_against_the_unet(line, deltas):
    store, name = line["store"], line["name"]
    base, v3 = registry.show(store, name, 1), registry.show(store, name, 3)
    delta_bytes = (deltas["vela"] / delta_lib.TENSORS_FILE).stat().st_size
    assert base["unet_bytes"] == v3["unet_bytes"] > 0
    assert base["stored_bytes"] > base["unet_bytes"]                # the whole folder
    assert delta_bytes < v3["stored_bytes"] < delta_bytes + 100_000  # the delta + manifest + pyfunc files
    # Only attn2 changed: about 5% of this tiny UNet (the same share as esd-x on the toy).
    assert v3["stored_fraction_of_unet"] < 0.06
    # The base is stored once: no erased version holds UNet weights.
    s3 = store.s3()
    bucket, prefix = store.s3_location(v3["source"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert not [k for k in keys if "/unet/" in k] and any(k.endswith(delta_lib.TENSORS_FILE) for k in keys)


def _expected_pipeline(tiny_sd, delta_dir):
    pipe = load_pipeline(tiny_sd)
    if delta_dir is not None:
        delta_lib.apply(pipe.unet, delta_lib.load(delta_dir))
    return pipe


@pytest.mark.parametrize("version,delta_key", [(1, None), (2, "circle"), (3, "vela")])
def test_load_equals_engine_apply(line, tiny_sd, deltas, tmp_path, version, delta_key):
    store = dataclasses.replace(line["store"], cache_dir=tmp_path / "cache")   # download, not a warm cache
    got = load_version(store, f"models:/{line['name']}/{version}")
    want = _expected_pipeline(tiny_sd, deltas[delta_key] if delta_key else None)
    got_state, want_state = got.unet.state_dict(), want.unet.state_dict()
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    images = generate(got, ["a red circle"], num_inference_steps=2)
    assert images.dtype == np.uint8 and images.shape == (1, 32, 32, 3)
    assert np.array_equal(images, generate(want, ["a red circle"], num_inference_steps=2))


def test_versions_differ_and_cache_is_reused(line, tmp_path):
    store = dataclasses.replace(line["store"], cache_dir=tmp_path / "cache")
    a = generate(load_version(store, f"{line['name']}/1"), ["a red circle"], num_inference_steps=2)
    c = generate(load_version(store, f"{line['name']}/3"), ["a red circle"], num_inference_steps=2)
    assert not np.array_equal(a, c)
    # One copy of each file, shared: the base's blobs serve v1 and v3's base alike.
    blobs = list((tmp_path / "cache" / "blobs").iterdir())
    assert len(blobs) == len({b.name for b in blobs})
    assert len(list((tmp_path / "cache" / "trees").iterdir())) == 2


def test_promote_rollback_history(line):
    store, name = line["store"], line["name"]
    registry.promote(store, name, 1, "base goes live", "ops")
    registry.promote(store, name, 2, "circle takedown REQ-1", "flow:takedown")
    registry.promote(store, name, 3, "Vela Moreau opt-out REQ-2", "flow:takedown")
    registry.promote(store, name, 3, "candidate for review", "flow:takedown", alias="candidate")
    assert registry.resolve(store, f"{name}@production").version == "3"

    back = registry.rollback(store, name, "complaint about quality", "alice")
    assert (back["from"], back["to"], back["action"]) == (3, 2, "rollback")
    back = registry.rollback(store, name, "still bad", "alice")           # skips 3: goes to 1
    assert (back["from"], back["to"]) == (3 - 1, 1)
    registry.rollback(store, name, "restore the opt-out", "alice", to=3)
    assert registry.resolve(store, f"models:/{name}@production").version == "3"

    events = registry.history(store, name)
    assert [(e["alias"], e["from"], e["to"], e["action"]) for e in events] == [
        ("production", None, 1, "promote"), ("production", 1, 2, "promote"), ("production", 2, 3, "promote"),
        ("candidate", None, 3, "promote"), ("production", 3, 2, "rollback"), ("production", 2, 1, "rollback"),
        ("production", 1, 3, "rollback")]
    assert events[1]["actor"] == "flow:takedown" and events[1]["reason"] == "circle takedown REQ-1"
    assert all(e["time"].endswith("+00:00") for e in events)
    assert registry.list_versions(store, name)[2]["aliases"] == ["candidate", "production"]

    unchanged = registry.promote(store, name, 3, "again", "ops")
    assert unchanged["changed"] is False and len(registry.history(store, name)) == len(events)
    for bad in [lambda: registry.promote(store, name, 9, "no such version", "ops"),
                lambda: registry.promote(store, name, 2, "  ", "ops"),
                lambda: registry.promote(store, name, 2, "x", "ops", alias="staging")]:
        with pytest.raises((registry.RegistryError, ReasonRequired)):
            bad()


def test_pyfunc_predict_returns_images(line, tmp_path, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", line["settings"].tracking_uri)
    monkeypatch.setenv("ESD_HOME", str(tmp_path))          # the pyfunc's base cache
    model = mlflow.pyfunc.load_model(f"models:/{line['name']}/3")
    images = model.predict(["a red circle", "a blue square"], params={"num_inference_steps": 2, "seed": 7})
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    direct = generate(load_version(line["store"], f"{line['name']}/3"), ["a red circle", "a blue square"],
                      seed=7, num_inference_steps=2)
    assert np.array_equal(images, direct)


def test_restart_keeps_versions_aliases_history(line, tmp_path):
    store, name, settings = line["store"], line["name"], line["settings"]
    registry.promote(store, name, 2, "before restart", "ops", alias="candidate")
    before = (registry.list_versions(store, name), registry.history(store, name))
    stack_lib.down(settings)
    assert not any(s.up for s in stack_lib.status(settings))
    stack_lib.up(settings, stack_lib.REGISTRY)
    assert (registry.list_versions(store, name), registry.history(store, name)) == before
    assert registry.resolve(store, f"{name}@candidate").version == "2"
    fresh = dataclasses.replace(store, cache_dir=tmp_path / "cache")
    load_version(fresh, f"{name}@production")                 # the bytes survived too


def test_corrupt_object_refuses_load_and_promote(backend_stack, tiny_sd, tmp_path):
    store = dataclasses.replace(Store.from_settings(backend_stack), cache_dir=tmp_path / "cache")
    name = f"toy-{uuid.uuid4().hex[:6]}"
    registry.import_base(store, tiny_sd, name)
    registry.register_erased(store, name, make_delta(tiny_sd, tmp_path / "d", ["circle"], seed=5))
    mark_gate(store, name, 2)
    registry.promote(store, name, 1, "live", "ops")
    history = registry.history(store, name)

    s3 = store.s3()
    bucket, prefix = store.s3_location(registry.show(store, name, 2)["source"])
    key = f"{prefix}/weights/{delta_lib.TENSORS_FILE}"
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    with pytest.raises(registry.IntegrityError, match="checksum mismatch in .*delta.safetensors"):
        load_version(store, f"{name}/2")
    with pytest.raises(registry.IntegrityError, match="checksum mismatch"):
        registry.promote(store, name, 2, "should be refused", "ops")
    assert registry.resolve(store, f"{name}@production").version == "1"
    assert registry.history(store, name) == history
    assert not list((tmp_path / "cache").glob("trees/*"))      # nothing half-made left in the cache

    # A broken base breaks every version on it: the base's UNet is checked too.
    bucket, prefix = store.s3_location(registry.show(store, name, 1)["source"])
    key = f"{prefix}/weights/unet/diffusion_pytorch_model.safetensors"
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    with pytest.raises(registry.IntegrityError, match="unet/diffusion_pytorch_model.safetensors"):
        registry.rollback(store, name, "refused", "ops", to=1)
    with pytest.raises(registry.IntegrityError):
        load_version(dataclasses.replace(store, cache_dir=tmp_path / "cache2"), f"{name}/1")


def test_every_file_of_a_version_is_checked_before_it_is_served(stack, tiny_sd, tmp_path, monkeypatch):
    """A changed MLmodel, pyfunc file or requirements, an extra file, and a consistent rewrite of manifest plus
    weights: each refused by registry.load, by registry.load.pyfunc and by MLflow's own pyfunc loader."""
    import hashlib
    import json

    import mlflow.pyfunc

    from registry.load import pyfunc

    store = dataclasses.replace(Store.from_settings(stack), cache_dir=tmp_path / "cache")
    name = f"toy-{uuid.uuid4().hex[:6]}"
    registry.import_base(store, tiny_sd, name)
    registry.register_erased(store, name, make_delta(tiny_sd, tmp_path / "d", ["circle"], seed=5))
    source = registry.show(store, name, 2)["source"]
    s3 = store.s3()
    bucket, prefix = store.s3_location(source)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/esd-version.json")["Body"].read())
    assert {"MLmodel", "pyfunc_model.py", "requirements.txt"} <= set(manifest["model_files"])
    requirements = s3.get_object(Bucket=bucket, Key=f"{prefix}/requirements.txt")["Body"].read().decode()
    assert "torch==" in requirements and "mlflow==" in requirements and "esd-platform==" in requirements
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    monkeypatch.setenv("ESD_HOME", str(tmp_path))
    mlflow.pyfunc.load_model(f"models:/{name}/2")            # the untouched version loads

    def get(rel: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=f"{prefix}/{rel}")["Body"].read()

    def rewrite_consistently() -> dict[str, bytes]:
        delta = bytearray(get(f"weights/{delta_lib.TENSORS_FILE}"))
        delta[-1] ^= 0xFF
        forged = json.loads(get("esd-version.json"))
        forged["files"][delta_lib.TENSORS_FILE]["sha256"] = hashlib.sha256(delta).hexdigest()
        return {f"weights/{delta_lib.TENSORS_FILE}": bytes(delta), "esd-version.json": json.dumps(forged).encode()}

    tampers = {"MLmodel": lambda: {"MLmodel": get("MLmodel") + b"\n# changed\n"},
               "pyfunc code": lambda: {"pyfunc_model.py": get("pyfunc_model.py") + b"\nprint('changed')\n"},
               "requirements": lambda: {"requirements.txt": b"torch\nsomething-else\n"},
               "an extra file": lambda: {"extra.py": b"import os\n"},
               "manifest and weights rewritten together": rewrite_consistently}
    for what, tamper in tampers.items():
        changes = tamper()
        saved = {rel: get(rel) for rel in changes if rel != "extra.py"}
        for rel, body in changes.items():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=body)
        try:
            loaders = {"registry.load": lambda: load_version(dataclasses.replace(store, cache_dir=tmp_path / what),
                                                             f"{name}/2"),
                       "registry.load.pyfunc": lambda: pyfunc(store, f"{name}/2"),
                       "mlflow.pyfunc.load_model": lambda: mlflow.pyfunc.load_model(f"models:/{name}/2")}
            if what == "an extra file":
                del loaders["registry.load"]     # it reads only the files the manifest lists; the pyfunc loaders
                #                                  would run whatever lies in the directory, so they refuse it
            for loader, load in loaders.items():
                with pytest.raises(Exception, match="checksum mismatch|not in the version's manifest|no registered"
                                                    " version's manifest|is stored but not"):
                    load()
                    pytest.fail(f"{loader} loaded a version with {what} changed")
            with pytest.raises(registry.IntegrityError):
                registry.verify(store, name, 2)
        finally:
            for rel, body in saved.items():
                s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=body)
            if "extra.py" in changes:
                s3.delete_object(Bucket=bucket, Key=f"{prefix}/extra.py")
    registry.verify(store, name, 2)
