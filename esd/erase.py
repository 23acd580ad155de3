"""ESD: erase a concept from a Stable Diffusion UNet (Gandikota et al., "Erasing Concepts from Diffusion
Models", ICCV 2023, arXiv 2303.07345).

The model being trained samples x_t itself, then learns to predict, for the concept c, the frozen model's
noise pushed *against* c (negative guidance):

    target = eps*(x_t, t) - eta * (eps*(x_t, c, t) - eps*(x_t, t))          (Eq. 7, eps* frozen)
    loss   = || eps_theta(x_t, c, t) - target ||^2

With an anchor a ("erase c, map it to a"), eps*(x_t, a, t) replaces the first eps*(x_t, t).

Two modes compute the same loss:
  reference  the paper's loop as written: a full frozen copy of the UNet, two separate frozen passes,
             text embeddings recomputed every iteration, gradients for every UNet parameter.
  fast       one UNet: the frozen model is the same UNet called with the trained parameters' original
             values swapped in (torch.func.functional_call); frozen passes batched; embeddings computed
             once; gradients only where they are used; optional bf16 autocast and gradient checkpointing.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from torch.func import functional_call
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from esd import delta as delta_lib
from esd import methods
from esd.models import Cond, as_noise, conditioning, prediction_type, storage_dtype

MAX_CONCEPT_CHARS = 200
# The paper's settings for Stable Diffusion 1.4 (ESD-x and ESD-u: 1000 iterations of one draw each, lr 1e-5, eta 1.0).
# A base folder may carry its own tuned defaults per method in esd_defaults.json (the toy's do): the
# right learning rate and strength depend on the model's scale, measured on the whole judged table.
PAPER_DEFAULTS = {"iterations": 1000, "lr": 1e-5, "eta": 1.0, "batch": 1}
# Closed-form methods (esd/uce.py): UCE's published settings (erase_scale 1, preserve_scale 1, lamb 0.5), no push
# away from the concept, no hardening rounds, and RECE's regulariser (0.1) for the recovered embeddings.
CLOSED_FORM_DEFAULTS = {"align": "final", "erase_scale": 1.0, "preserve_scale": 1.0, "lamb": 0.5, "push": 0.0,
                        "rounds": 0, "robust_reg": 0.1, "attack_rounds": 0, "attack_steps": 60, "attack_scale": 1.0}
# ESD's retain loss, beyond which prompts it holds: used by a prompted run only (esd-u-retain)
RETAIN_SETTINGS = ("retain_mix", "hold_guides")
# Settings only one kind of method uses: resolve leaves the other kind's alone and the manifest leaves them out.
ESD_ONLY = ("iterations", "lr", "eta", "batch", "ddim_steps", "guidance", "mode", "sample_steps", "precision",
            "gradient_checkpointing", "rank") + RETAIN_SETTINGS
CLOSED_FORM_ONLY = ("align", "erase_scale", "lamb", "push", "rounds", "robust_reg", "attack_rounds", "attack_steps",
                    "attack_scale", "soft_tokens")
# Recorded by an erasure for its lineage to solve it again (the soft tokens its adversarial rounds learned), not asked
RECORDED = ("soft_tokens",)
# Settings of both kinds: the prompts a concept is erased in (with their guides) and the concepts held in place. An ESD
# method given them erases inside the templates and adds a retain loss on the preserve prompts (esd-u-retain).
PROMPT_SETTINGS = ("templates", "guide", "preserve", "preserve_scale")
MAX_TEMPLATES, MAX_PRESERVE, MAX_ROUNDS, MAX_ATTACK_STEPS = 64, 512, 10, 1000
# Bounds on what one request may ask of a worker: ESD's paper runs 1000 iterations over 50 DDIM steps.
MAX_ITERATIONS, MAX_DDIM_STEPS, MAX_BATCH, MAX_RANK = 100_000, 1000, 64, 1024
# Fast mode reaches x_t in at most this many DDIM jumps instead of up to 50 steps (the sampling is ~85% of the
# reference loop's cost); its effect on erasure is measured by `esd bench speed` (reference vs fast H score).
FAST_SAMPLE_STEPS = 10


class EraseError(ValueError):
    """Bad erasure input; the message names the problem in one line."""


def _finite(value) -> bool:
    """Whether a setting's value is a finite number (an int or a float)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def validate_concept(text: str, what: str = "concept") -> str:
    """A concept is 1..200 printable characters; returns it stripped."""
    if not isinstance(text, str) or not text.strip():
        raise EraseError(f"{what} is empty")
    if len(text) > MAX_CONCEPT_CHARS:
        raise EraseError(f"{what} is {len(text)} characters long; the limit is {MAX_CONCEPT_CHARS}")
    if any(not ch.isprintable() for ch in text):
        raise EraseError(f"{what} contains control characters: {text!r}")
    return text.strip()


def normal_concept(text: str) -> str:
    """A concept as compared: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


@dataclass
class EraseConfig:
    concepts: list[str]
    method: str = "esd-x"
    iterations: int | None = None     # None: the base's default for the method, else PAPER_DEFAULTS
    lr: float | None = None           # likewise
    eta: float | None = None          # negative guidance strength; likewise (the paper's 1.0)
    batch: int | None = None          # draws (prompt, noise) per step, at one timestep; likewise (the paper's 1)
    ddim_steps: int = 50
    guidance: float = 3.0             # guidance while sampling x_t
    seed: int = 0
    anchor: str | None = None
    mode: str = "fast"                # "fast" | "reference"
    sample_steps: int | None = None   # fast only: at most this many DDIM jumps to reach x_t (None: every step)
    precision: str = "auto"           # "fp32" | "bf16" (autocast, fp32 master weights) | "auto": where it pays
    gradient_checkpointing: bool = False
    rank: int | None = None           # each trained weight (matrix or kernel) changed by a product of two factors of
                                      # this rank (LoRA), biases and norms trained in full; None: every value free
    concept_kind: str | None = None      # the request's kind (style, object, ...): picks per-kind defaults
    # Both kinds; None: the base's default for the method, else CLOSED_FORM_DEFAULTS (ESD: none, the paper's loop)
    templates: list | None = None        # prompts containing "{concept}", or [prompt, guide prompt] pairs
                                         # (None: the concept alone)
    guide: str | None = None             # what the concept maps onto (the anchor, if given; else "": removed)
    preserve: list[str] | None = None    # concepts that must not move (closed form: their keys and values; ESD: their
                                         # predictions, a retain loss)
    preserve_scale: float | None = None  # how strongly the preserve prompts are held
    retain_mix: float | None = None      # ESD: each held preserve prompt's conditioning mixed with another's (or the
                                         # empty prompt's) by a share drawn up to this; 0: held as written
    hold_guides: bool | None = None      # ESD: the guide prompts held by the retain loss too, beside the preserve prompts
    # Closed-form methods only (uce, uce-robust); None: the base's default for the method, else CLOSED_FORM_DEFAULTS
    align: str | None = None             # "final": UCE's tokens (final word on); "concept": the concept's own too
    erase_scale: float | None = None
    lamb: float | None = None            # how strongly the weights stay where they were
    push: float | None = None            # 0: map onto the guide; > 0: past it, away from the concept
    rounds: int | None = None            # hardening rounds against recovered embeddings (uce-robust: 2)
    robust_reg: float | None = None      # regulariser of the recovered embedding
    attack_rounds: int | None = None     # rounds of textual inversion against the edit, each token found erased too
    attack_steps: int | None = None      # optimisation steps of each round's inversion
    attack_scale: float | None = None    # weight of the soft tokens' prompts, beside the erase prompts' erase_scale
    soft_tokens: dict | None = None      # per concept, the input embeddings those rounds learned (recorded)

    @classmethod
    def with_overrides(cls, concepts: list[str], method: str, overrides: dict) -> "EraseConfig":
        """A config from a request's concept and method plus settings given as a dict (a flow's parameters),
        validated: an unknown setting or a bad value is refused before any work."""
        if not isinstance(overrides, dict):
            raise EraseError(f"erase settings must be a mapping, got {type(overrides).__name__}")
        recorded = sorted(set(overrides) & set(RECORDED))
        if recorded:
            raise EraseError(f"{recorded[0]!r} is recorded by an erasure, not a setting a request gives")
        unknown = sorted(set(overrides) - (set(cls.__dataclass_fields__) - {"concepts", "method"}))
        if unknown:
            raise EraseError(f"unknown erase setting {unknown[0]!r}")
        return cls(list(concepts), method=method, **overrides).validate()

    @property
    def kind(self) -> str:
        return methods.get(self.method).kind

    def validate(self) -> "EraseConfig":
        if not self.concepts:
            raise EraseError("no concept given")
        self.concepts = [validate_concept(c) for c in self.concepts]
        if self.anchor is not None:
            self.anchor = validate_concept(self.anchor, "anchor")
        methods.get(self.method)
        self._validate_settings()
        for name, most in (("iterations", MAX_ITERATIONS), ("ddim_steps", MAX_DDIM_STEPS), ("batch", MAX_BATCH),
                           ("sample_steps", None), ("rank", MAX_RANK)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise EraseError(f"{name} must be a positive integer, got {value}")
            if value is not None and most is not None and value > most:
                raise EraseError(f"{name} is {value}; the limit is {most}")
        for name in ("eta", "lr"):
            value = getattr(self, name)
            if value is not None and not (_finite(value) and value > 0):
                raise EraseError(f"{name} must be > 0, got {value}")
        if not (_finite(self.guidance) and self.guidance >= 0):
            raise EraseError(f"guidance must be >= 0, got {self.guidance}")
        if self.mode not in ("fast", "reference"):
            raise EraseError(f"unknown mode {self.mode!r}; choose fast or reference")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise EraseError(f"unknown precision {self.precision!r}; choose auto, fp32 or bf16")
        return self

    def resolve(self, model_defaults: dict | None = None) -> "EraseConfig":
        """Fill what was left unset: the base's defaults for this method, then the method's own, then the paper's."""
        self.validate()
        method = methods.get(self.method)
        if method.kind == "combined":
            return self      # each part resolves its own settings (part_config)
        own = dict((model_defaults or {}).get("*", {})) | dict((model_defaults or {}).get(self.method, {}))
        own = {k: v for k, v in for_kind(own, self.concept_kind).items() if v is not None}
        if self.preserve is None and own.get("preserve"):
            # a default preservation set never holds the concept being erased
            erased = {normal_concept(c) for c in self.concepts}
            own["preserve"] = [p for p in own["preserve"] if normal_concept(p) not in erased]
        if method.kind == "closed-form":
            for name, value in (CLOSED_FORM_DEFAULTS | method.defaults | own).items():
                if getattr(self, name, None) is None and name in CLOSED_FORM_ONLY + PROMPT_SETTINGS:
                    setattr(self, name, value)
            self.guide = self.anchor if self.anchor is not None else (self.guide or "")
            return self.validate()
        for name, value in (PAPER_DEFAULTS | method.defaults | own).items():
            if getattr(self, name, None) is None and name in self.__dataclass_fields__ and name not in CLOSED_FORM_ONLY:
                setattr(self, name, value)
        if self.prompted:
            # ESD inside templates: each template's guide prompt takes the place of the unconditioned prediction
            self.guide = self.anchor if self.anchor is not None else (self.guide or "")
            if self.preserve and self.preserve_scale is None:
                self.preserve_scale = CLOSED_FORM_DEFAULTS["preserve_scale"]
        if self.mode == "reference":
            self.sample_steps = None   # the paper's loop samples x_t with every DDIM step
        elif self.sample_steps is None:
            self.sample_steps = FAST_SAMPLE_STEPS
        return self.validate()

    @property
    def prompted(self) -> bool:
        """Whether an ESD run erases inside templates (or toward a guide) and holds preserve prompts, rather than the
        paper's loop on the bare concept."""
        return any(getattr(self, name) is not None for name in ("templates", "guide", "preserve"))

    def _validate_settings(self) -> None:
        if self.kind == "esd":
            for name in CLOSED_FORM_ONLY:
                if getattr(self, name) is not None:
                    raise EraseError(f"{name} applies to closed-form methods "
                                     f"({', '.join(n for n, m in methods.METHODS.items() if m.kind != 'esd')}),"
                                     f" not {self.method}")
        if self.templates is not None:
            if isinstance(self.templates, str) or not self.templates:
                raise EraseError("templates must be a non-empty list of prompts containing {concept}")
            if len(self.templates) > MAX_TEMPLATES:
                raise EraseError(f"{len(self.templates)} templates; the limit is {MAX_TEMPLATES}")
            for i, t in enumerate(self.templates):
                pair = [t] if isinstance(t, str) else list(t) if isinstance(t, (list, tuple)) else []
                if len(pair) not in (1, 2) or not all(isinstance(x, str) for x in pair):
                    raise EraseError(f"template {t!r} is neither a prompt nor a [prompt, guide prompt] pair")
                pair = [validate_concept(x, "template") for x in pair]
                if "{concept}" not in pair[0]:
                    raise EraseError(f"template {pair[0]!r} does not contain {{concept}}")
                self.templates[i] = pair[0] if len(pair) == 1 else pair
        if self.guide is not None:
            if not isinstance(self.guide, str):
                raise EraseError(f"guide must be text, got {self.guide!r}")
            self.guide = validate_concept(self.guide, "guide") if self.guide.strip() else ""
            if self.anchor is not None and self.guide != self.anchor:
                raise EraseError(f"anchor {self.anchor!r} and guide {self.guide!r} differ; give one of them")
        if self.preserve is not None:
            if isinstance(self.preserve, str):
                raise EraseError("preserve must be a list of concepts")
            if len(self.preserve) > MAX_PRESERVE:
                raise EraseError(f"{len(self.preserve)} preserve concepts; the limit is {MAX_PRESERVE}")
            self.preserve = [validate_concept(p, "preserve concept") for p in self.preserve]
            erased = {normal_concept(c) for c in self.concepts}
            for p in self.preserve:
                if normal_concept(p) in erased:
                    raise EraseError(f"preserve contains {p!r}, a concept being erased")
        if self.align is not None and self.align not in ("final", "concept"):
            raise EraseError(f"unknown align {self.align!r}; choose final or concept")
        if self.preserve_scale is not None and not (_finite(self.preserve_scale) and self.preserve_scale >= 0):
            raise EraseError(f"preserve_scale must be a finite number >= 0, got {self.preserve_scale}")
        if self.retain_mix is not None and not (_finite(self.retain_mix) and 0 <= self.retain_mix <= 1):
            raise EraseError(f"retain_mix must be a number from 0 to 1, got {self.retain_mix}")
        if self.hold_guides is not None and not isinstance(self.hold_guides, bool):
            raise EraseError(f"hold_guides must be true or false, got {self.hold_guides!r}")
        if self.kind == "esd":
            return
        for name in ("erase_scale", "push", "attack_scale"):
            value = getattr(self, name)
            if value is not None and not (_finite(value) and value >= 0):
                raise EraseError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("lamb", "robust_reg"):   # > 0: each keeps its solve's matrix invertible
            value = getattr(self, name)
            if value is not None and not (_finite(value) and value > 0):
                raise EraseError(f"{name} must be a finite number > 0, got {value}")
        for name, least, most in (("rounds", 0, MAX_ROUNDS), ("attack_rounds", 0, MAX_ROUNDS),
                                  ("attack_steps", 1, MAX_ATTACK_STEPS)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not least <= value <= most):
                raise EraseError(f"{name} must be an integer from {least} to {most}, got {value}")
        if self.soft_tokens is not None:
            named = {normal_concept(c) for c in self.concepts}
            if not (isinstance(self.soft_tokens, dict) and all(
                    isinstance(c, str) and normal_concept(c) in named and isinstance(vs, list) and all(
                        isinstance(v, list) and v and all(_finite(x) for x in v)
                        for v in vs) for c, vs in self.soft_tokens.items())):
                raise EraseError("soft_tokens must map each erased concept to embeddings, lists of finite numbers")

    def used(self) -> dict:
        """The settings this run's method uses (the manifest's hyperparameters)."""
        skip = {"concepts"} | set({"esd": CLOSED_FORM_ONLY, "closed-form": ESD_ONLY}.get(self.kind, ()))
        if self.kind == "esd" and not self.prompted:
            skip |= set(PROMPT_SETTINGS + RETAIN_SETTINGS)
        return {k: v for k, v in asdict(self).items() if k not in skip}


def for_kind(defaults: dict, kind: str | None) -> dict:
    """Defaults with each per-request-kind value ({"style": ..., "object": ..., "*": ...}) taken for KIND."""
    return {k: (v.get(kind, v.get("*")) if isinstance(v, dict) else v) for k, v in defaults.items()}


def fill(template: str, text: str) -> str:
    """The template filled with text, whitespace collapsed (an empty guide leaves the template's other words)."""
    return " ".join(template.replace("{concept}", text).split())


def prompts(cfg: EraseConfig) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(erase prompt, guide prompt, concept) for each concept and template, and (prompt, prompt, concept) for the
    preserve prompts. A template is one prompt (its guide: the same prompt with the guide text) or a
    [prompt, guide prompt] pair."""
    pairs = [(t, t) if isinstance(t, str) else tuple(t) for t in (cfg.templates or ["{concept}"])]
    erase = [(fill(t, c), fill(g, cfg.guide or ""), c) for c in cfg.concepts for t, g in pairs]
    preserve = [(fill(t, p), fill(t, p), p) for p in (cfg.preserve or []) for t, _ in pairs]
    return erase, preserve


def base_folder(pipe) -> Path | None:
    """The local folder a pipeline was loaded from, if any."""
    folder = str(getattr(pipe, "name_or_path", "") or "")
    return Path(folder) if folder and Path(folder).is_dir() else None


def model_defaults(pipe) -> dict:
    """esd_defaults.json of the pipeline's base folder, if it has one."""
    folder = base_folder(pipe)
    path = folder / "esd_defaults.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> torch.Tensor:
    """Token embeddings (N, 77, D) the UNet's cross-attention reads (SDXL: both text encoders' side by side)."""
    return conditioning(pipe, prompts).hidden


def ddim_step(x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, alphas: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from timestep t to t_prev (t_prev < 0: the clean sample)."""
    a_t = alphas[t]
    a_prev = alphas[t_prev] if t_prev >= 0 else torch.ones((), device=alphas.device)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def _bf16_pays(unet: torch.nn.Module) -> bool:
    """bf16 autocast pays on GPUs, and on CPUs with AMX for UNets of SD size (measured: ~1.7x at 140M
    parameters, nothing at the toy's 6.6M)."""
    if unet.device.type == "cuda":
        return True
    if unet.device.type != "cpu" or sum(p.numel() for p in unet.parameters()) < 50_000_000:
        return False
    try:
        return "AMX_BF16" in open("/proc/cpuinfo").read().upper()
    except OSError:
        return False


def delta_dtype(pipe) -> torch.dtype:
    """The dtype changed values are rounded to: the one the base stores its UNet in, so a delta is no bigger or
    finer than the weights it replaces and base + delta is exactly the model that was evaluated."""
    folder = base_folder(pipe)
    return (storage_dtype(folder) if folder else None) or pipe.unet.dtype


def start_from(unet: torch.nn.Module, parent: delta_lib.Delta | None,
               apply: bool = True) -> tuple[str, dict[str, torch.Tensor]]:
    """The base's sha256 and the base values of the parent's tensors, the parent checked against the base and, unless
    apply is False (a trained erasure adds it when it ends: Eraser.finish), applied in place."""
    base_sha256 = delta_lib.unet_sha256(unet)
    own = unet.state_dict()
    base_state = {k: own[k].detach().clone() for k in (parent.tensors if parent is not None else {})}
    if parent is not None:
        if apply:
            delta_lib.apply(unet, parent, base_sha256)
        else:
            delta_lib.check_base(parent, base_sha256)
    return base_sha256, base_state


# Settings a lineage's trained erasures may differ in and still be trained again together (trained_again)
OWN_SETTINGS = ("seed", "iterations", "preserve")


def trained_again(parent: delta_lib.Delta | None, cfg: EraseConfig, params: list[str]) -> list[dict]:
    """The parent's trained erasures that a new trained erasure (cfg, resolved, on `params`) trains again with its own
    concepts, from the base: every erasure of the lineage that changed any of these parameters, when all of them were
    made by cfg's method with cfg's settings (their own seed, iterations and preserve prompts apart). Trained one at a
    time against the base and added, two shape erasures undo part of each other (README, Stacking). Empty when there
    are none, or when an erasure by another method or with other settings changed these parameters: the new one is
    then trained alone and the parent's changes added to it, as they cannot be told apart."""
    if parent is None:
        return []
    entries = []
    for e in parent.manifest.get("erasures", []):
        method = methods.METHODS.get(e.get("method"))
        if method is None or e.get("hyperparameters") is None:
            return []
        if not any(method.selects(n) for n in params):
            continue
        if e["method"] != cfg.method:
            return []
        entries.append(e)
    if not entries:
        return []
    concepts = {normal_concept(c) for e in entries for c in e["concepts"]} | {normal_concept(c) for c in cfg.concepts}

    def settings(hp: dict) -> str:
        kept = {k: v for k, v in hp.items() if k not in OWN_SETTINGS and v is not None}   # unset as never recorded
        preserve = sorted({normal_concept(p) for p in hp.get("preserve") or []} - concepts)
        return json.dumps(kept | {"preserve": preserve}, sort_keys=True, default=str)

    mine = settings(cfg.used())
    return entries if all(settings(e["hyperparameters"]) == mine for e in entries) else []


def finish_delta(unet: torch.nn.Module, cfg: EraseConfig, base_sha256: str, base_state: dict[str, torch.Tensor],
                 dtype: torch.dtype, parent_manifest: dict | None, final_loss: float | None,
                 prediction: str = "epsilon", trained_with: list[str] | None = None) -> delta_lib.Delta:
    """Round the UNet's tensors named in base_state to dtype, in place, and diff them against the base, with the
    manifest every method writes."""
    state = unet.state_dict()
    keys = set(base_state)
    with torch.no_grad():
        for k in keys:
            state[k].copy_(state[k].to(dtype))
    this = {"concepts": cfg.concepts, "method": cfg.method, "anchor": cfg.anchor, "hyperparameters": cfg.used()}
    if trained_with:
        this["trained_with"] = trained_with
    earlier = list((parent_manifest or {}).get("erasures", []))
    manifest = {
        "base_sha256": base_sha256,
        "method": cfg.method,
        "concepts": cfg.concepts,
        "anchor": cfg.anchor,
        "seed": cfg.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "prediction_type": prediction,
        "hyperparameters": cfg.used(),
        "final_loss": final_loss,
        "erasures": earlier + [this],
        "all_concepts": sorted({c for e in earlier + [this] for c in e["concepts"]}),
    }
    return delta_lib.diff({k: base_state[k] for k in keys}, {k: state[k] for k in keys}, manifest, dtype=dtype)


def esd_target(eps_0: torch.Tensor, eps_c: torch.Tensor, eta: float, eps_a: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 7: the frozen prediction (unconditional, or the anchor's) guided away from the concept."""
    return (eps_0 if eps_a is None else eps_a) - eta * (eps_c - eps_0)


class LowRank(torch.nn.Module):
    """A trained weight's change as the product of two factors of rank r (LoRA, Hu et al. 2021), a convolution's kernel
    flattened per output channel; `up` starts at zero, so training starts from the weight as it is."""

    def __init__(self, weight: torch.Tensor, rank: int, gen: torch.Generator):
        super().__init__()
        fan_in = weight[0].numel()
        self.shape = weight.shape
        self.down = torch.nn.Parameter((torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)).to(weight.device))
        self.up = torch.nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).view(self.shape).to(weight.dtype)


class Eraser:
    """One ESD run over a pipeline's UNet, trained in place. `run()` returns the Delta against the base."""

    def __init__(self, pipe, cfg: EraseConfig, parent: delta_lib.Delta | None = None):
        if methods.get(cfg.method).kind != "esd":
            raise EraseError(f"{cfg.method} is a closed-form method, not trained by the ESD loop; use erase()")
        self.pipe, self.cfg = pipe, cfg.resolve(model_defaults(pipe))
        self.unet = pipe.unet
        self.device = self.unet.device
        self.parent = parent
        self.parent_manifest = parent.manifest if parent is not None else None
        # Trained values are rounded to the base's storage dtype (see delta_dtype).
        self.storage_dtype = delta_dtype(pipe)
        # Trained against the base, as if it were the lineage's first erasure; the parent's changes are added when it
        # ends (finish). Trained over the parent instead, each erasure of a lineage moved what every prompt shares
        # further than the last (README, Stacking). Base values of every parameter the new delta may hold: the
        # parent's changes and the trained ones.
        self.base_sha256, self.base_state = start_from(self.unet, parent, apply=False)
        self.params = methods.select(self.unet, cfg.method)
        # The lineage's erasures by this method with these settings are trained again with this one, from the base, as
        # one erasure of all their concepts with their iterations added (trained_again); the delta replaces their
        # changes to these parameters and records this request's concepts, naming the others as trained with it.
        self.request = self.cfg
        again = trained_again(parent, self.cfg, list(self.params))
        self.trained_with = list(dict.fromkeys(c for e in again for c in e["concepts"]))
        if again:
            joint = self.trained_with + [c for c in self.cfg.concepts if c not in self.trained_with]
            erased = {normal_concept(c) for c in joint}
            self.cfg = replace(self.cfg, concepts=joint,
                               iterations=self.cfg.iterations + sum(e["hyperparameters"]["iterations"] for e in again),
                               preserve=[p for p in self.cfg.preserve or [] if normal_concept(p) not in erased] or None)
            cfg = self.cfg
        # Values the frozen model sees for the trained parameters; the base's for the rest of the diff.
        self.original = {n: p.detach().clone() for n, p in self.params.items()}
        for n, v in self.original.items():
            self.base_state.setdefault(n, v)

        sched = pipe.scheduler
        sched.set_timesteps(cfg.ddim_steps)
        self.timesteps = [int(t) for t in sched.timesteps]
        self.alphas = sched.alphas_cumprod.to(self.device, torch.float32)
        # ESD's target (Eq. 7) and the DDIM step are written for noise predictions: a v-prediction UNet's outputs
        # are converted to noise at x_t, the loss included, so one set of settings serves both kinds of model.
        self.prediction = prediction_type(pipe)
        self.gen = torch.Generator("cpu").manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.latent_shape = (1, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cfg.mode == "fast" and _bf16_pays(self.unet))
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

        # A prompted run: the concepts in their templates with their guide prompts, and the preserve prompts
        self.pairs, kept = prompts(self.cfg) if self.cfg.prompted else ([], [])
        self.keep = [p for p, _, _ in kept] if self.cfg.preserve_scale else []
        if self.keep and self.cfg.hold_guides:
            # what the concept is pushed toward keeps its own meaning: a generic "a red shape" is not erased with it
            self.keep = list(dict.fromkeys(self.keep + [g for _, g, _ in self.pairs if g]))

        self.unet.train()
        if cfg.mode == "reference":
            # As written in the paper's code: a second full UNet as the frozen teacher, classic attention,
            # and every UNet parameter left requiring grad although only the method's parameters are stepped.
            self.frozen = copy.deepcopy(self.unet).eval().requires_grad_(False)
            self.frozen.set_attn_processor(AttnProcessor())
            self.unet.set_attn_processor(AttnProcessor())
            self.unet.requires_grad_(True)
        else:
            self.frozen = None
            self.unet.requires_grad_(False)
            for p in self.params.values():
                p.requires_grad_(True)
            self.embeddings = self._embeddings()
            if cfg.gradient_checkpointing:
                self.unet.enable_gradient_checkpointing()
        # The frozen model: the trained parameters' original values swapped in (fast mode)
        self.frozen_values = dict(self.original)
        self.low_rank = self._low_rank(cfg.rank) if cfg.rank else []
        trained = [p for m, attr in self.low_rank for p in m.parametrizations[attr][0].parameters()]
        trained += [p for n, p in self.params.items() if not (cfg.rank and p.dim() > 1)]
        self.opt = torch.optim.Adam(trained, lr=cfg.lr)

    def _low_rank(self, rank: int) -> list[tuple[torch.nn.Module, str]]:
        """Each trained weight of two or more dimensions changed through a LowRank factor pair (torch's parametrize);
        the frozen model sees the factors' product as zero. Its own generator: the draws stay as without it."""
        gen = torch.Generator("cpu").manual_seed(self.cfg.seed)
        modules = dict(self.unet.named_modules())
        out = []
        for name, p in self.params.items():
            if p.dim() < 2:
                continue
            owner, attr = name.rsplit(".", 1)
            module = modules[owner]
            p.requires_grad_(False)
            factors = LowRank(p.detach(), rank, gen)
            parametrize.register_parametrization(module, attr, factors)
            del self.frozen_values[name]
            self.frozen_values[f"{owner}.parametrizations.{attr}.0.up"] = torch.zeros_like(factors.up)
            out.append((module, attr))
        return out

    def _prompts(self) -> list[str]:
        """Every prompt a step may use: the concepts (in their templates, with their guide prompts), the anchor,
        the preserve prompts, and the empty prompt."""
        if not self.cfg.prompted:
            return [""] + self.cfg.concepts + ([self.cfg.anchor] if self.cfg.anchor else [])
        return list(dict.fromkeys([""] + [p for pair in self.pairs for p in pair[:2]] + self.keep))

    def _embeddings(self) -> dict[str, Cond]:
        prompts = self._prompts()
        cond = conditioning(self.pipe, prompts)
        return {p: cond[i] for i, p in enumerate(prompts)}

    def _conds(self, prompts: list[str]) -> list[Cond]:
        """The conditioning of each prompt: computed once (fast) or every step, as the paper's loop does (reference)."""
        if self.frozen is None:
            return [self.embeddings[p] for p in prompts]
        cond = conditioning(self.pipe, prompts)
        return [cond[i] for i in range(len(prompts))]

    def _frozen_eps(self, x: torch.Tensor, t: int, parts: list[Cond]) -> list[torch.Tensor]:
        """The frozen model's noise predictions at x (a batch) for each conditioning of parts (a batch each like x):
        one batched call of the same UNet with the original values (fast), or the frozen copy per part (reference)."""
        if self.frozen is None:
            xs = x.repeat(len(parts), 1, 1, 1)
            with torch.no_grad(), self.autocast:
                out = functional_call(self.unet, self.frozen_values, (xs, t), Cond.cat(parts).kwargs()).sample.float()
            return list(as_noise(out, xs, self.alphas[t], self.prediction).split(len(x)))
        with torch.no_grad():
            return [as_noise(self.frozen(x, t, **e.kwargs()).sample, x, self.alphas[t], self.prediction) for e in parts]

    def _sample_x_t(self, emb_c: Cond, emb_0: Cond, stop: int) -> torch.Tensor:
        """x_t for each conditioning of emb_c: guided DDIM with the model being trained, from noise down to
        timesteps[stop]."""
        n = len(emb_c)
        x = torch.randn((n,) + self.latent_shape[1:], generator=self.gen).to(self.device)
        path = self.timesteps[: stop + 1]
        if self.cfg.sample_steps is not None and stop > self.cfg.sample_steps:
            idx = torch.linspace(0, stop, self.cfg.sample_steps + 1).round().long().tolist()
            path = [self.timesteps[i] for i in idx]
        cond = Cond.cat([emb_0.repeat(n), emb_c])
        # parametrize.cached: a low-rank run's weights are the base's plus the factors' product, formed once per sampling
        with torch.no_grad(), self.autocast, parametrize.cached():
            for t, t_prev in zip(path, path[1:]):
                out = self.unet(torch.cat([x, x]), t, **cond.kwargs()).sample.float()
                eps_0, eps_c = as_noise(out, torch.cat([x, x]), self.alphas[t], self.prediction).chunk(2)
                eps = eps_0 + self.cfg.guidance * (eps_c - eps_0)
                x = ddim_step(x, eps, t, t_prev, self.alphas)
        return x

    def _mixed(self, emb_k: Cond, emb_0: Cond) -> Cond:
        """The preserve prompts' conditionings, each moved toward another preserve prompt's or the empty prompt's by
        a share drawn uniformly up to retain_mix: the retain loss holds the space between the prompts it names, where
        a concept no preservation set names may lie, not only the prompts themselves."""
        n = len(emb_k)
        partners = [self.keep[self._pick(len(self.keep))] for _ in range(n)]
        partners = Cond.cat([emb_0 if self._pick(len(self.keep) + 1) == 0 else c for c in self._conds(partners)])
        share = torch.rand(n, generator=self.gen).to(self.device) * self.cfg.retain_mix

        def mix(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else torch.lerp(a, b, share.view(-1, *[1] * (a.dim() - 1)).to(a.dtype))

        return Cond(mix(emb_k.hidden, partners.hidden), mix(emb_k.pooled, partners.pooled),
                    mix(emb_k.time_ids, partners.time_ids))

    def _pick(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.gen))

    def step(self) -> float:
        cfg, n = self.cfg, self.cfg.batch
        # Draw `batch` concepts (each in one of its templates, with its guide prompt) and the step at which their x_t
        # are taken (uniform over the DDIM steps); a prompted run also draws as many preserve prompts
        if cfg.prompted:
            drawn = [self.pairs[self._pick(len(self.pairs))][:2] for _ in range(n)]
        else:
            drawn = [(cfg.concepts[self._pick(len(cfg.concepts))], cfg.anchor) for _ in range(n)]
        stop = self._pick(cfg.ddim_steps)
        t = self.timesteps[stop]
        kept = [self.keep[self._pick(len(self.keep))] for _ in range(n)] if self.keep else []
        references = [r for _, r in drawn if r is not None]   # guide prompts, or the anchor, or none
        conds = self._conds([""] + [c for c, _ in drawn] + references + kept)
        emb_0, emb_c = conds[0], Cond.cat(conds[1:n + 1])
        emb_r = Cond.cat(conds[n + 1:2 * n + 1]) if references else None
        emb_k = Cond.cat(conds[-n:]) if kept else None
        if emb_k is not None and cfg.retain_mix:
            emb_k = self._mixed(emb_k, emb_0)

        # Sample x_t with the model being trained, guided by the concept
        x = self._sample_x_t(emb_c, emb_0, stop)

        # Frozen model: the conditional predictions; the reference (guide prompt or anchor) or else the unconditional
        # ones; the unconditional ones beside an anchor; the preserve prompts'
        anchored = emb_r is not None and not cfg.prompted
        parts = ([emb_c, emb_r if emb_r is not None else emb_0.repeat(n)] + ([emb_0.repeat(n)] if anchored else [])
                 + ([emb_k] if emb_k is not None else []))
        eps_c, eps_r, *more = self._frozen_eps(x, t, parts)
        # Target: the frozen prediction guided away from the concept (Eq. 7); inside a template, away from the concept
        # relative to its guide prompt (the template's other words keep their meaning)
        target = esd_target(more[0], eps_c, cfg.eta, eps_r) if anchored else esd_target(eps_r, eps_c, cfg.eta)

        # Prediction of the model being trained, for the concept (and the preserve prompt: held to the frozen one)
        trained = [emb_c] + ([emb_k] if emb_k is not None else [])
        xs = x.repeat(len(trained), 1, 1, 1)
        with self.autocast:
            out = self.unet(xs, t, **Cond.cat(trained).kwargs()).sample.float()
        pred = as_noise(out, xs, self.alphas[t], self.prediction).split(n)
        loss = F.mse_loss(pred[0], target)
        if emb_k is not None:
            loss = loss + cfg.preserve_scale * F.mse_loss(pred[1], more[-1])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def run(self, progress: bool = True, callback=None) -> delta_lib.Delta:
        bar = tqdm(range(self.cfg.iterations), desc=f"erase {', '.join(self.cfg.concepts)}", disable=not progress)
        losses = []
        for i in bar:
            losses.append(self.step())
            bar.set_postfix(loss=f"{losses[-1]:.5f}")
            if callback is not None:
                callback(i + 1, losses[-1])
        return self.finish(losses)

    def finish(self, losses: list[float]) -> delta_lib.Delta:
        """Restore the UNet for inference, add the parent's changes (to a trained parameter, its change from the base)
        and diff it against the base."""
        for module, attr in self.low_rank:       # the weights become the base's plus the factors' product
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        self.low_rank = []
        self.unet.eval().requires_grad_(False)
        if self.cfg.gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()
        if self.frozen is not None:
            self.unet.set_default_attn_processor()
            self.frozen = None
        if self.parent is not None:
            state = self.unet.state_dict()
            with torch.no_grad():
                for name, value in self.parent.tensors.items():
                    value = value.to(self.device, state[name].dtype)
                    if name in self.params:
                        if not self.trained_with:        # else trained again here: replaced
                            state[name].add_(value - self.base_state[name])
                    else:
                        state[name].copy_(value)
        return finish_delta(self.unet, self.request, self.base_sha256, self.base_state, self.storage_dtype,
                            self.parent_manifest, losses[-1] if losses else None, self.prediction, self.trained_with)


def erase(pipe, cfg: EraseConfig, parent: delta_lib.Delta | None = None, progress: bool = True,
          callback=None) -> delta_lib.Delta:
    """Erase cfg.concepts from the base pipeline's UNet, in place, and return the delta against that base.

    With a parent delta (an earlier version), the new delta, still taken against the base, carries the parent's
    changes too: a trained method trains against the base and adds them after; a closed-form one applies them
    first. Closed-form methods (uce, uce-robust) run esd/uce.py; a combined method (uce-tokens-esd,
    uce-tokens-xout) runs its trained part, then its closed-form part (combined()).
    """
    kind = methods.get(cfg.method).kind
    if kind == "combined":
        return combined(pipe, cfg, parent, progress, callback)
    if kind == "closed-form":
        from esd import uce

        return uce.edit(pipe, cfg, parent, progress, callback)
    return Eraser(pipe, cfg, parent).run(progress, callback)


def part_config(pipe, cfg: EraseConfig, part: str) -> EraseConfig:
    """The config of one part of a combined method: the settings given that the part uses, over the base's defaults
    for the combination (esd_defaults.json, under the combined method's name), over the part's own resolution."""
    kind = methods.get(part).kind
    unused = {"concepts", "method"} | set(CLOSED_FORM_ONLY if kind == "esd" else ESD_ONLY)
    own = for_kind(model_defaults(pipe).get(cfg.method, {}), cfg.concept_kind)
    given = {k: v for k, v in asdict(cfg).items() if v is not None}
    settings = {k: v for k, v in (own | given).items() if k not in unused and v is not None}
    return EraseConfig(list(cfg.concepts), method=part, **settings).validate()


def combined(pipe, cfg: EraseConfig, parent: delta_lib.Delta | None = None, progress: bool = True,
             callback=None) -> delta_lib.Delta:
    """A combined method: its trained part, then its closed-form part taking the trained one as its parent (so that a
    later closed-form takedown re-solves the edit with the lineage's and leaves the trained weights as they are); one
    delta whose manifest names the combination and lists both parts among its erasures."""
    cfg.validate()
    trained_name, closed_name = methods.get(cfg.method).parts
    trained = Eraser(pipe, part_config(pipe, cfg, trained_name), parent)
    first = trained.run(progress, callback)
    with torch.no_grad():                 # the edit starts from the base and applies the trained part as its parent
        state = pipe.unet.state_dict()
        for name, value in trained.base_state.items():
            state[name].copy_(value)
    from esd import uce

    out = uce.edit(pipe, part_config(pipe, cfg, closed_name), first, progress, callback)
    out.manifest.update(method=cfg.method, hyperparameters=cfg.used())
    return out
