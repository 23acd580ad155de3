import gzip

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
    from safetensors.torch import load, save
    tensors = load(gzip.decompress(files["tensors"].read_bytes()))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    files["tensors"].write_bytes(gzip.compress(save(tensors)))
    with pytest.raises(delta_lib.DeltaError, match="do not match"):
        delta_lib.load(tmp_path / "d")
    files["tensors"].write_bytes(files["tensors"].read_bytes()[:-100])
    with pytest.raises(delta_lib.DeltaError, match="unreadable"):
        delta_lib.load(tmp_path / "d")


def test_the_file_is_a_gzipped_safetensors_with_the_same_bytes_every_time(tiny_sd, tmp_path):
    d = erase(load_pipeline(tiny_sd), cfg("circle"), progress=False)
    first = delta_lib.save(d, tmp_path / "a")["tensors"]
    second = delta_lib.save(d, tmp_path / "b")["tensors"]
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes()[4:8] == bytes(4)      # gzip header time zeroed: bytes do not depend on when
    from safetensors.torch import load
    plain = load(gzip.decompress(first.read_bytes()))
    assert plain.keys() == d.tensors.keys() and all(torch.equal(plain[k], d.tensors[k]) for k in plain)


def test_delta_is_kept_in_the_bases_storage_dtype(tiny_sd, tmp_path):
    from tests.conftest import build_tiny_sd

    half = build_tiny_sd(tmp_path / "half", dtype=torch.float16)
    erased = load_pipeline(half)                    # computed in float32 from float16 weights
    d = erase(erased, cfg("circle"), progress=False)
    assert {t.dtype for t in d.tensors.values()} == {torch.float16} and d.manifest["dtype"] == "float16"
    assert d.num_bytes == 2 * d.num_parameters
    # the erased model is exactly base + delta: its trained weights were rounded to the stored dtype
    fresh = load_pipeline(half)
    delta_lib.apply(fresh.unet, d)
    assert_same_unet(fresh.unet, erased.unet)
    # a float32 base keeps float32 deltas
    assert {t.dtype for t in erase(load_pipeline(tiny_sd), cfg("circle"), progress=False).tensors.values()} == \
        {torch.float32}


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


def test_a_trained_erasure_on_a_lineage_is_trained_against_the_base_and_adds_the_parents_changes(tiny_sd):
    """The second erasure's trained weights are the ones it gets from the base alone, plus the parent's change where
    both changed a weight; the parent's other tensors are carried as they are."""
    base = {k: v.clone() for k, v in load_pipeline(tiny_sd).unet.state_dict().items()}
    first = erase(load_pipeline(tiny_sd), cfg("circle", "esd-x-strict"), progress=False)
    alone = erase(load_pipeline(tiny_sd), cfg("square", "esd-x"), progress=False)
    second = erase(load_pipeline(tiny_sd), cfg("square", "esd-x"), parent=first, progress=False)
    assert set(first.tensors) < set(alone.tensors) == set(second.tensors)
    for name, value in second.tensors.items():
        expected = alone.tensors[name] + first.tensors[name] - base[name] if name in first.tensors else alone.tensors[name]
        torch.testing.assert_close(value, expected)
        if name in first.tensors:
            assert not torch.equal(value, alone.tensors[name])
    carried = erase(load_pipeline(tiny_sd), cfg("square", "selfattn"), parent=first, progress=False)
    assert all(torch.equal(carried.tensors[n], t) for n, t in first.tensors.items())


def test_trained_erasures_of_one_method_and_settings_on_a_lineage_are_trained_again_together(tiny_sd):
    """A second trained erasure by the method and settings of the lineage's earlier one trains both concepts from the
    base with their iterations added: to the bit, the one erasure of both; the closed-form change between them is
    carried, and the manifest names this request's concept and the one trained with it."""
    first = erase(load_pipeline(tiny_sd), cfg("circle", "esd-u"), progress=False)
    kv = erase(load_pipeline(tiny_sd), EraseConfig(["Vela Moreau"], method="uce"), parent=first, progress=False)
    second = erase(load_pipeline(tiny_sd), cfg("square", "esd-u"), parent=kv, progress=False)
    both = erase(load_pipeline(tiny_sd), EraseConfig(["circle", "square"], method="esd-u", iterations=4, ddim_steps=3,
                                                     lr=1e-3), progress=False)
    assert set(second.tensors) == set(both.tensors) | set(kv.tensors)
    for name, value in second.tensors.items():
        assert torch.equal(value, both.tensors[name] if name in both.tensors else kv.tensors[name]), name
    this = second.manifest["erasures"][-1]
    assert this["concepts"] == ["square"] and this["trained_with"] == ["circle"]
    assert this["hyperparameters"]["iterations"] == 2 and second.manifest["all_concepts"] == ["Vela Moreau", "circle",
                                                                                              "square"]
    # a third takes both earlier ones: six iterations over three concepts
    third = erase(load_pipeline(tiny_sd), cfg("triangle", "esd-u"), parent=second, progress=False)
    assert third.manifest["erasures"][-1]["trained_with"] == ["circle", "square"]
    three = erase(load_pipeline(tiny_sd), EraseConfig(["circle", "square", "triangle"], method="esd-u", iterations=6,
                                                      ddim_steps=3, lr=1e-3), progress=False)
    assert all(torch.equal(third.tensors[n], t) for n, t in three.tensors.items())


def test_a_trained_erasure_with_other_settings_on_a_lineage_is_trained_alone_and_added(tiny_sd):
    """Settings other than the seed, iterations and preserve prompts differ (here eta): the earlier change cannot be
    trained again as it was made, so the new erasure is trained from the base alone and the parent's change added."""
    base = {k: v.clone() for k, v in load_pipeline(tiny_sd).unet.state_dict().items()}
    first = erase(load_pipeline(tiny_sd), cfg("circle", "esd-u"), progress=False)
    def other():
        return EraseConfig(["square"], method="esd-u", iterations=2, ddim_steps=3, lr=1e-3, eta=2.0)

    alone = erase(load_pipeline(tiny_sd), other(), progress=False)
    second = erase(load_pipeline(tiny_sd), other(), parent=first, progress=False)
    assert "trained_with" not in second.manifest["erasures"][-1]
    for name, value in second.tensors.items():
        torch.testing.assert_close(value, alone.tensors[name] + first.tensors[name] - base[name])


def test_a_parent_made_for_another_base_is_refused_before_training(tiny_sd):
    first = erase(load_pipeline(tiny_sd), cfg("circle", "esd-x-strict"), progress=False)
    first.manifest["base_sha256"] = "0" * 64
    with pytest.raises(delta_lib.DeltaError, match="delta was made for base 000000000000"):
        erase(load_pipeline(tiny_sd), cfg("square", "esd-x"), parent=first, progress=False)
