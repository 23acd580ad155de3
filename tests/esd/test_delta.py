import pytest
import torch

from esd import delta as delta_lib
from esd.erase import EraseConfig, erase
from esd.models import load_pipeline


def cfg(concept, method="esd-x"):
    return EraseConfig([concept], method=method, iterations=2, ddim_steps=3, lr=1e-3)


def assert_same_unet(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_is_bit_exact(tiny_sd, tmp_path):
    erased = load_pipeline(tiny_sd)
    d = erase(erased, cfg("circle"), progress=False)
    delta_lib.save(d, tmp_path / "d")
    loaded = delta_lib.load(tmp_path / "d")
    assert loaded.manifest["concepts"] == ["circle"] and loaded.manifest["method"] == "esd-x"
    assert loaded.manifest["parameters"] == d.num_parameters and loaded.manifest["bytes"] == d.num_bytes
    assert set(loaded.manifest["library_versions"]) >= {"torch", "diffusers", "transformers"}
    assert loaded.manifest["hyperparameters"]["lr"] == 1e-3 and loaded.manifest["seed"] == 0
    fresh = load_pipeline(tiny_sd)
    before = delta_lib.unet_sha256(fresh.unet)
    delta_lib.apply(fresh.unet, loaded)
    assert_same_unet(fresh.unet, erased.unet)
    assert delta_lib.unet_sha256(fresh.unet) != before
    assert not list((tmp_path / "d").glob("*.pt")) and not list((tmp_path / "d").glob("*.bin"))


def test_delta_for_another_base_is_refused(tiny_sd, other_tiny_sd):
    d = erase(load_pipeline(tiny_sd), cfg("circle"), progress=False)
    other = load_pipeline(other_tiny_sd).unet
    before = delta_lib.unet_sha256(other)
    with pytest.raises(delta_lib.DeltaError, match="made for base"):
        delta_lib.apply(other, d)
    assert delta_lib.unet_sha256(other) == before


def test_tampered_tensors_are_refused(tiny_sd, tmp_path):
    d = erase(load_pipeline(tiny_sd), cfg("circle"), progress=False)
    files = delta_lib.save(d, tmp_path / "d")
    from safetensors.torch import load_file, save_file
    tensors = load_file(files["tensors"])
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, files["tensors"])
    with pytest.raises(delta_lib.DeltaError, match="do not match"):
        delta_lib.load(tmp_path / "d")


def test_stacked_erasures_carry_the_parents_changes(tiny_sd):
    first_pipe = load_pipeline(tiny_sd)
    first = erase(first_pipe, cfg("circle", "esd-x-strict"), progress=False)
    second_pipe = load_pipeline(tiny_sd)
    second = erase(second_pipe, cfg("square", "selfattn"), parent=first, progress=False)
    assert set(first.tensors) < set(second.tensors)
    assert second.manifest["all_concepts"] == ["circle", "square"]
    assert [e["concepts"] for e in second.manifest["erasures"]] == [["circle"], ["square"]]
    # base + the one delta reproduces the stacked model
    fresh = load_pipeline(tiny_sd)
    delta_lib.apply(fresh.unet, second)
    assert_same_unet(fresh.unet, second_pipe.unet)
