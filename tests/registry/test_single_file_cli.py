"""`esd base import FILE.safetensors` and `esd model export` against the real stack: a tiny single-file checkpoint
in, its versions out as a file and as a folder, and back in under another name with the same UNet."""

from __future__ import annotations

import json
import uuid

import pytest

from esd import single_file
from esd.delta import file_sha256, unet_sha256
from esd.toy import tiny
from registry.store import Store
from registry.versions import register_erased, show
from tests.registry.conftest import run
from tests.registry.deltas import make_delta


def test_single_file_in_and_out(env, stack, tmp_path):
    from diffusers import UNet2DConditionModel

    from esd import delta as delta_lib

    store = Store.from_settings(stack)
    folder = tiny.build(tmp_path / "tiny", "sd21-v", seed=3)
    file = tmp_path / "tiny.safetensors"
    single_file.export(folder, file)
    a, b = f"sf-{uuid.uuid4().hex[:6]}", f"sf-{uuid.uuid4().hex[:6]}"

    imported = run(env, "base", "import", str(file), "--name", a, "--arch", "sd21-v")
    assert imported.exit_code == 0, imported.output
    assert f"registered {a} v1: converted from single file tiny.safetensors (sd21-v)" in imported.stdout
    base_sha = show(store, a, 1)["base_sha256"]
    assert base_sha == unet_sha256(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))

    # the base out as one file and in again under another name: the same UNet
    out = tmp_path / "v1.safetensors"
    exported = run(env, "model", "export", a, "1", "--format", "single-file", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.strip() == (f"exported {a} v1 (sd21-v, single-file) to {out}: sha256 {file_sha256(out)}, "
                                       f"unet sha256 {base_sha}")
    again = run(env, "base", "import", str(out), "--name", b, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["converted_from"]["arch"] == "sd21-v"
    assert show(store, b, 1)["base_sha256"] == base_sha

    # an erased version out as a folder: base + delta, the UNet the registry's delta makes
    register_erased(store, a, make_delta(folder, tmp_path / "delta", ["Vela Moreau"], seed=1))
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    delta_lib.apply(unet, delta_lib.load(tmp_path / "delta"))
    erased = unet_sha256(unet)
    as_folder = tmp_path / "v2"
    exported = run(env, "model", "export", a, "2", "--format", "diffusers", "--out", str(as_folder))
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.strip() == f"exported {a} v2 (sd21-v, diffusers) to {as_folder}: unet sha256 {erased}"
    assert unet_sha256(UNet2DConditionModel.from_pretrained(as_folder, subfolder="unet")) == erased
    as_file = tmp_path / "v2.safetensors"
    assert run(env, "model", "export", a, "2", "--format", "single-file", "--out", str(as_file)).exit_code == 0
    back = single_file.to_diffusers(as_file, tmp_path / "v2-back")
    assert unet_sha256(UNet2DConditionModel.from_pretrained(back, subfolder="unet")) == erased

    # refused, one line, nothing written
    for args, message in [
        (("model", "export", a, "2", "--format", "single-file", "--out", str(as_file)), "already exists"),
        (("model", "export", a, "9", "--format", "diffusers", "--out", str(tmp_path / "v9")), "no model version"),
        (("model", "export", a, "1", "--format", "diffusers", "--out", str(tmp_path / "no" / "dir")),
         "is not a directory"),
        (("base", "import", str(file), "--name", f"sf-{uuid.uuid4().hex[:6]}", "--arch", "sdxl"),
         "holds an sd21-v model (its embedded configs say so), not sdxl"),
        (("base", "import", str(folder), "--name", f"sf-{uuid.uuid4().hex[:6]}", "--arch", "sd15"),
         "--arch is for a single-file checkpoint"),
    ]:
        refused = run(env, *args)
        assert refused.exit_code == 1 and message in refused.stderr and refused.stderr.count("\n") == 1, refused.output
    assert not (tmp_path / "v9").exists() and not (tmp_path / "no").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("arch", ["sd15", "sd21-v", "sdxl"])
def test_each_architecture_end_to_end_through_the_registry(env, stack, tmp_path, arch):
    """Import a tiny base of ARCH (a single file), erase with each method that applies, register each erasure,
    load and generate from the registry, export the last as one file and import it again: the same UNet."""
    from esd import sample
    from esd.erase import EraseConfig, erase
    from esd.models import load_pipeline
    from registry import load

    store, name = Store.from_settings(stack), f"tiny-{arch.replace('-', '')}-{uuid.uuid4().hex[:4]}"
    file = tmp_path / "base.safetensors"
    single_file.export(tiny.build(tmp_path / "folder", arch, seed=5), file, arch)
    imported = run(env, "base", "import", str(file), "--name", name, "--arch", arch)
    assert imported.exit_code == 0 and f"({arch})" in imported.output, imported.output
    base_dir = tmp_path / "converted"
    single_file.to_diffusers(file, base_dir, arch)
    for method in ("esd-x", "esd-u", "uce"):
        cfg = EraseConfig(["red circle"], method=method, iterations=2, ddim_steps=4, seed=0).validate()
        delta = erase(load_pipeline(base_dir), cfg, progress=False)
        from esd import delta as delta_lib

        version = register_erased(store, name, delta_lib.save(delta, tmp_path / method)["tensors"].parent)["version"]
        pipe = load.load(store, f"{name}/{version}")
        assert unet_sha256(pipe.unet) != show(store, name, 1)["base_sha256"]
        image = sample.generate(pipe, ["a red circle"], [0], steps=2)
        assert image.shape == (1, 3, 32, 32)
    # the served model: MLflow's pyfunc of the last version, its files checked before anything is read
    import mlflow.pyfunc
    import numpy as np

    from infra.env import environ

    with environ({"MLFLOW_TRACKING_URI": stack.tracking_uri, "ESD_HOME": str(tmp_path / "serving")} | stack.mlflow_env()):
        served = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        images = served.predict(["a red circle"], params={"num_inference_steps": 2, "seed": 3})
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape == (1, 32, 32, 3)

    out = tmp_path / "last.safetensors"
    exported = run(env, "model", "export", name, str(version), "--format", "single-file", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    again = run(env, "base", "import", str(out), "--name", f"{name}-again", "--json")
    assert json.loads(again.stdout)["base_sha256"] == exported.output.split("unet sha256 ")[1].split()[0] == \
        unet_sha256(load.load(store, f"{name}/{version}").unet)
