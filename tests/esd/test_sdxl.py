"""SDXL through the engine, on a tiny random SDXL folder: two text encoders, pooled embedding and size ids."""

import pytest
import torch
from typer.testing import CliRunner

from esd import delta as delta_lib
from esd import methods, sample
from esd.cli import app
from esd.erase import EraseConfig, Eraser, erase
from esd.models import Cond, ModelError, conditioning, is_xl, load_pipeline
from esd.toy import tiny


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("tiny-xl") / "base", "sdxl", seed=0)


def cfg(**kw):
    base = dict(concepts=["red circle"], method="esd-x", iterations=2, ddim_steps=4, lr=1e-3, seed=0)
    base.update(kw)
    return EraseConfig(**base).validate()


def test_the_tiny_sdxl_folder_is_an_sdxl_pipeline_and_the_same_for_the_same_seed(tiny_xl, tmp_path):
    pipe = load_pipeline(tiny_xl)
    assert is_xl(pipe) and pipe.text_encoder_2 is not None
    assert pipe.unet.config.addition_embed_type == "text_time"
    again = load_pipeline(tiny.build(tmp_path / "again", "sdxl", seed=0))
    assert delta_lib.unet_sha256(again.unet) == delta_lib.unet_sha256(pipe.unet)


def test_conditioning_carries_both_encoders_pooled_text_and_size_ids(tiny_xl):
    pipe = load_pipeline(tiny_xl)
    cond = conditioning(pipe, ["", "a red circle"])
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cond.hidden.shape == (2, 77, width) == (2, 77, pipe.unet.config.cross_attention_dim)
    assert cond.pooled.shape == (2, pipe.text_encoder_2.config.projection_dim)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert cond.time_ids.tolist() == [[size, size, 0, 0, size, size]] * 2
    # the empty prompt is the pipeline's own unconditional input: zeros (force_zeros_for_empty_prompt)
    assert not cond.hidden[0].any() and not cond.pooled[0].any() and cond.hidden[1].any()
    # rows, concatenation and repetition keep all three parts in step
    both = Cond.cat([cond[1], cond[0]])
    assert torch.equal(both.pooled, cond.pooled.flip(0)) and len(cond[1].repeat(3)) == 3
    kwargs = cond.kwargs()
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}


@pytest.mark.parametrize("method", ["esd-x", "esd-x-strict", "esd-u", "uce"])
def test_each_method_changes_only_its_parameters_and_the_delta_rebuilds_the_model(tiny_xl, method):
    pipe = load_pipeline(tiny_xl)
    d = erase(pipe, cfg(method=method), progress=False)
    chosen = methods.get(method).selects
    assert d.tensors and all(chosen(k) for k in d.tensors)
    if method == "esd-u":
        assert not any(k.startswith("add_embedding.") for k in d.tensors)   # it reads the pooled text
    again = erase(load_pipeline(tiny_xl), cfg(method=method), progress=False)
    assert again.manifest["tensors_sha256"] == d.manifest["tensors_sha256"]
    fresh = load_pipeline(tiny_xl)
    delta_lib.apply(fresh.unet, d, d.manifest["base_sha256"])
    assert delta_lib.unet_sha256(fresh.unet) == delta_lib.unet_sha256(pipe.unet)
    images = sample.generate(fresh, ["a red circle"], [0], steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_fast_and_reference_compute_the_same_loss_on_sdxl(tiny_xl):
    for anchor in (None, "blue square"):
        losses = [Eraser(load_pipeline(tiny_xl), cfg(mode=mode, anchor=anchor)).step() for mode in ("reference", "fast")]
        assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-7)


def test_a_folder_without_its_second_text_encoder_is_named(tiny_xl, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_xl, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelError, match="text_encoder_2/config.json"):
        load_pipeline(broken)


def test_cli_builds_and_erases_a_tiny_sdxl(tmp_path):
    runner = CliRunner()
    built = runner.invoke(app, ["toy", "tiny", "--arch", "sdxl", "--out", str(tmp_path / "xl")])
    assert built.exit_code == 0 and "sdxl tiny base" in built.output, built.output
    out = runner.invoke(app, ["erase", "red circle", "--method", "esd-x", "--iterations", "2", "--ddim-steps", "4",
                              "--base", str(tmp_path / "xl"), "--out", str(tmp_path / "delta")])
    assert out.exit_code == 0, out.output
    assert delta_lib.load(tmp_path / "delta").manifest["base_sha256"] == built.output.split("sha256 ")[1].split()[0]
