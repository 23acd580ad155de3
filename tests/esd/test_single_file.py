"""Single-file checkpoints: diffusers folder -> one file in the original layout -> folder again, bit for bit; the
file is what diffusers' from_single_file reads; the shipped architecture configs are the reference models' own."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esd import single_file as sf
from esd.toy import tiny

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]       # "a photo of a cat" in CLIP's own vocabulary
PARTS = {"sd15": ["unet", "vae", "text_encoder"], "sd21": ["unet", "vae", "text_encoder"],
         "sd21-v": ["unet", "vae", "text_encoder"], "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2"]}


def weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """A component's stored tensors, keyed without transformers' text_model wrapper."""
    name = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
    return {k.removeprefix("text_model."): v for k, v in load_file(folder / part / f"{name}.safetensors").items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module", params=["sd15", "sd21-v", "sdxl"])
def converted(request, tmp_path_factory):
    """(arch, tiny folder, its single file, the sha256 export returned, the folder imported back from the file)."""
    arch = request.param
    if arch not in tiny.ARCHS:
        pytest.skip(f"esd.toy.tiny does not build {arch} yet")
    root = tmp_path_factory.mktemp(arch)
    folder = tiny.build(root / "model", arch, seed=0)
    file = root / "model.safetensors"
    sha = sf.export(folder, file)
    with pytest.MonkeyPatch.context() as offline:       # the import reaches no hub: no connection is even tried
        offline.setattr(socket.socket, "connect", no_network)
        back = sf.to_diffusers(file, root / "back")
    return arch, folder, file, sha, back


def no_network(*args, **kwargs):
    raise AssertionError("the import tried to open a network connection")


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd15-file")
    file = root / "model.safetensors"
    sf.export(tiny.build(root / "model", "sd15", seed=1), file)
    return file


def test_round_trip_is_bit_for_bit(converted):
    from esd.delta import file_sha256

    arch, folder, file, sha, back = converted
    assert sha == file_sha256(file)
    for part in PARTS[arch]:
        assert_identical(weights(folder, part), weights(back, part))
    scheduler = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if arch == "sd21-v" else "epsilon")
    # exporting the re-imported folder gives the same tensors again; exporting twice gives the same bytes
    again = file.with_name("again.safetensors")
    sf.export(back, again)
    assert_identical(load_file(file), load_file(again))
    assert sf.export(folder, file.with_name("twice.safetensors")) == sha


def test_file_is_in_the_original_layout(converted):
    from safetensors import safe_open

    arch, folder, file, _, _ = converted
    with safe_open(file, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata[sf.ARCH_KEY] == arch
    assert json.loads(metadata[sf.CONFIGS_KEY])["unet/config.json"] == (folder / "unet" / "config.json").read_text()
    prefixes = {"model.diffusion_model.", "first_stage_model.", *sf.TEXT[arch].values()}
    assert all(any(k.startswith(p) for p in prefixes) for k in keys)
    assert {p for p in prefixes if any(k.startswith(p) for k in keys)} == prefixes
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert load_file(file)["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4     # a 1x1 convolution
    if arch != "sd15":
        encoder = sf.TEXT[arch]["text_encoder_2" if arch == "sdxl" else "text_encoder"]
        assert f"{encoder}transformer.resblocks.0.attn.in_proj_weight" in keys


def test_diffusers_reads_the_file_and_the_import_generates(converted):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    arch, folder, file, _, back = converted
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    extra = {"add_watermarker": False} if arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    direct = cls.from_single_file(str(file), config=str(folder), local_files_only=True, **extra)
    assert_identical(weights(folder, "unet"), direct.unet.state_dict())
    pipe = cls.from_pretrained(back, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_half_precision_stays_half(tmp_path):
    folder = tiny.build(tmp_path / "model", "sd15", seed=0, dtype=torch.float16)
    sf.export(folder, tmp_path / "m.safetensors")
    back = sf.to_diffusers(tmp_path / "m.safetensors", tmp_path / "back")
    for part in PARTS["sd15"]:
        stored = weights(back, part)
        assert {t.dtype for t in stored.values()} == {torch.float16}
        assert_identical(weights(folder, part), stored)


def _bare(file: Path, out: Path, metadata: dict | None = None) -> Path:
    """FILE's tensors without the configs export embeds (as a checkpoint from elsewhere would be)."""
    save_file(load_file(file), out, metadata={"format": "pt", **(metadata or {})})
    return out


@pytest.mark.parametrize("case, message", [
    ("missing", "checkpoint file not found"),
    ("folder", "checkpoint file not found"),
    ("text", "is not a safetensors file"),
    ("unknown arch", "unknown architecture 'sd3'; choose one of: sd15, sd21, sd21-v, sdxl"),
    ("no arch", "carries no configs of its own: say which architecture it is with --arch"),
    ("other family", "is an SD 1.x checkpoint, not sd21-v"),
    ("sdxl as sd15", "is an SDXL checkpoint, not sd15"),
    ("contradicts its configs", "holds an sd15 model (its embedded configs say so), not sd21"),
    ("tiny with the real configs", "does not fit the sd15 architecture: model.diffusion_model.input_blocks.0.0.weight "
                                   "has shape (32, 4, 3, 3), sd15 expects (320, 4, 3, 3)"),
    ("a component's file", "is not a Stable Diffusion checkpoint in the original layout"),
    ("unsafe embedded path", "the checkpoint's embedded config names an unsafe path: '../escape.json'"),
    ("out exists", "already exists"),
])
def test_bad_checkpoints_are_one_line_errors(case, message, sd15_file, tmp_path):
    arch = {"unknown arch": "sd3", "other family": "sd21-v", "sdxl as sd15": "sd15", "contradicts its configs": "sd21",
            "tiny with the real configs": "sd15"}.get(case)
    file = {"missing": tmp_path / "nothing.safetensors", "folder": tmp_path, "text": tmp_path / "a.safetensors",
            "no arch": tmp_path / "bare.safetensors", "other family": tmp_path / "bare.safetensors",
            "tiny with the real configs": tmp_path / "bare.safetensors",
            "a component's file": tmp_path / "unet.safetensors", "sdxl as sd15": tmp_path / "xl.safetensors",
            "unsafe embedded path": tmp_path / "unsafe.safetensors"}.get(case, sd15_file)
    (tmp_path / "a.safetensors").write_text("not a checkpoint")
    _bare(sd15_file, tmp_path / "bare.safetensors")
    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    save_file({k: torch.zeros(1) for k in ("model.diffusion_model.out.2.bias", "first_stage_model.quant_conv.bias",
                                           sf.FAMILY_KEYS["sdxl"])}, tmp_path / "xl.safetensors")
    _bare(sd15_file, tmp_path / "unsafe.safetensors", {sf.ARCH_KEY: "sd15", sf.CONFIGS_KEY: '{"../escape.json": "{}"}'})
    out = tmp_path / "out"
    if case == "out exists":
        out.mkdir()
    with pytest.raises(sf.SingleFileError) as err:
        sf.to_diffusers(file, out, arch)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "escape.json").exists() and (case == "out exists" or not out.exists())


@pytest.mark.parametrize("arch, message", [
    ("sd21-v", "is an sd15 model, not sd21-v"),
    ("sdxl", "is an sd15 model, not sdxl"),
    ("sd3", "unknown architecture 'sd3'"),
])
def test_export_refuses_a_wrong_arch(arch, message, tmp_path):
    folder = tiny.build(tmp_path / "model", "sd15", seed=0)
    with pytest.raises(sf.SingleFileError, match=message):
        sf.export(folder, tmp_path / "m.safetensors", arch)
    with pytest.raises(sf.SingleFileError, match="is not a diffusers model folder"):
        sf.export(tmp_path, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("arch, params, width, prediction, kind", [
    ("sd15", 859_520_964, 768, "epsilon", "v1"),
    ("sd21", 865_910_724, 1024, "epsilon", "v2"),
    ("sd21-v", 865_910_724, 1024, "v_prediction", "v2"),
    ("sdxl", 2_567_463_684, 2048, "epsilon", "xl_base"),
])
def test_shipped_configs_are_the_reference_models(arch, params, width, prediction, kind, tmp_path):
    """The UNet each shipped config builds (on the meta device: no memory) has the reference model's parameter
    count and width; the tokenizers built from CLIP's BPE file give CLIP's own ids; and the original layout the
    full-size model exports to is the one diffusers recognises as that model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    config = sf.arch_config(arch, tmp_path / arch)
    unet_config = json.loads((config / "unet" / "config.json").read_text())
    vae_config = json.loads((config / "vae" / "config.json").read_text())
    assert unet_config["cross_attention_dim"] == width
    assert json.loads((config / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(unet_config).state_dict(),
                 "vae": AutoencoderKL.from_config(vae_config).state_dict()}
        for part in sf.TEXT[arch]:
            cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
            parts[part] = cls(CLIPTextConfig.from_pretrained(config / part)).state_dict()
    assert sum(t.numel() for t in parts["unet"].values()) == params
    assert sum(t.numel() for t in parts["vae"].values()) == 83_653_863
    assert infer_diffusers_model_type(sf.to_original(arch, parts, {"unet": unet_config, "vae": vae_config})) == kind
    pads = {"tokenizer": 0 if arch.startswith("sd21") else 49407, "tokenizer_2": 0}
    for tok in sorted(config.glob("tokenizer*")):
        tokenizer = CLIPTokenizer.from_pretrained(tok)
        assert tokenizer("a photo of a cat").input_ids == CAT
        assert (len(tokenizer), tokenizer.model_max_length, tokenizer.pad_token_id) == (49408, 77, pads[tok.name])


def test_the_same_model_gives_the_same_file_wherever_it_was_loaded_from(tmp_path):
    from esd.models import load_pipeline

    folder = tiny.build(tmp_path / "a", "sd21-v", seed=0)
    load_pipeline(folder).save_pretrained(tmp_path / "resaved", safe_serialization=True)   # configs name "a"
    assert "_name_or_path" in (tmp_path / "resaved" / "unet" / "config.json").read_text()
    assert sf.export(folder, tmp_path / "1.safetensors") == \
        sf.export(tmp_path / "resaved", tmp_path / "2.safetensors")
