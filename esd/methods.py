"""Which UNet parameters each erasure method changes, and how: one table (Gandikota et al. 2023, Sec. 4).

Cross-attention only (ESD-x) ties the erasure to the prompt's words, right for artist styles; everything
but cross-attention (ESD-u) erases the concept globally, right for nudity and objects. Closed-form methods
(UCE, and UCE hardened RECE-style) solve for new cross-attention key/value projections instead of training
(esd/uce.py). A combined method runs a trained method and then a closed-form one on the same concepts, one delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    selects: Callable[[str], bool]
    kind: str = "esd"                 # "esd": trained by the ESD loop (esd/erase.py); "closed-form": esd/uce.py;
                                      # "combined": its parts in turn, on the same concepts (esd.erase.combined)
    defaults: dict = field(default_factory=dict, compare=False)   # the method's own defaults, under the base's
    benchmarked: bool = False         # compared by `esd bench quality` when no --methods is given
    parts: tuple[str, ...] = ()       # combined: a trained method, then a closed-form one


def _xattn(n: str) -> bool:
    return ".attn2." in n


def _unconditioned(n: str) -> bool:
    """ESD-u's parameters: none that reads the text (cross-attention; SDXL's added embedding of the pooled text and
    size ids, which acts like cross-attention) and not the time embedding."""
    return not _xattn(n) and not n.startswith(("time_embedding.", "add_embedding."))


def _xattn_kv(n: str) -> bool:
    return ".attn2.to_k." in n or ".attn2.to_v." in n


def _xattn_out(n: str) -> bool:
    return ".attn2.to_out." in n


def _xattn_kv_weights(n: str) -> bool:
    return _xattn_kv(n) and n.endswith(".weight")


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("esd-x", "cross-attention (attn2): erasure tied to the prompt's words; for styles", _xattn,
           benchmarked=True),
    Method("esd-x-strict", "cross-attention keys and values only (attn2.to_k, attn2.to_v)", _xattn_kv),
    Method("esd-u", "everything but cross-attention and the time embedding: global erasure; for objects, nudity",
           _unconditioned, benchmarked=True),
    Method("esd-u-retain", "ESD-u inside templates, away from the concept toward each template's guide, with a retain "
           "loss holding the preserve prompts to the frozen model's predictions", _unconditioned, benchmarked=True),
    Method("esd-all", "every UNet parameter", lambda n: True),
    Method("selfattn", "self-attention (attn1)", lambda n: ".attn1." in n),
    Method("uce", "closed form: cross-attention key/value weights map the concept onto a guide (UCE)",
           _xattn_kv_weights, kind="closed-form", benchmarked=True),
    Method("uce-robust", "UCE re-solved against the embeddings that still recover the concept (RECE)",
           _xattn_kv_weights, kind="closed-form", defaults={"rounds": 2}, benchmarked=True),
    Method("uce-tokens", "UCE that also maps the concept's own tokens, wherever they stand in the prompt",
           _xattn_kv_weights, kind="closed-form", defaults={"align": "concept"}, benchmarked=True),
    Method("uce-tokens-robust", "uce-tokens re-solved against the embeddings that still recover the concept",
           _xattn_kv_weights, kind="closed-form", defaults={"align": "concept", "rounds": 2}, benchmarked=True),
    Method("uce-tokens-adv", "uce-tokens re-solved against soft tokens learned on its own edit by textual inversion "
           "of what the model drew of the concept (adversarial rounds, as AdvUnlearn; the tokens are kept in the "
           "manifest)", _xattn_kv_weights, kind="closed-form",
           defaults={"align": "concept", "attack_rounds": 2, "attack_scale": 0.1},
           benchmarked=True),
    Method("uce-tokens-esd", "a short esd-u-retain erasure of what the UNet draws, then the uce-tokens edit of the "
           "keys and values: the edit takes the concept out of the prompt, the trained part holds against a recovered "
           "prompt", lambda n: _unconditioned(n) or _xattn_kv_weights(n), kind="combined",
           parts=("esd-u-retain", "uce-tokens"), benchmarked=True),
    Method("esd-xout-retain", "ESD-u-retain's loss on the cross-attention output projections only (attn2.to_out): "
           "what the UNet makes of the values it read from the text, not which text gives which values", _xattn_out),
    Method("uce-tokens-xout", "a short esd-xout-retain erasure, then the uce-tokens edit: the edit takes the concept out "
           "of the prompt, the trained output projections stop a recovered prompt's values from drawing it",
           lambda n: _xattn_out(n) or _xattn_kv_weights(n), kind="combined", parts=("esd-xout-retain", "uce-tokens"),
           benchmarked=True),
]}

DEFAULT_BY_KIND = {"style": "uce-tokens-adv", "object": "esd-u-retain", "nudity": "esd-u", "custom": "esd-u"}


class MethodError(ValueError):
    """An unknown method, or one that selects nothing on this UNet."""


def get(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def select(unet: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters the method trains, by name; an empty selection is an error."""
    method = get(name)
    chosen = {n: p for n, p in unet.named_parameters() if method.selects(n)}
    if not chosen:
        raise MethodError(f"method {name!r} selects no parameters of this UNet")
    return chosen


def count(unet: torch.nn.Module, name: str) -> int:
    return sum(p.numel() for p in select(unet, name).values())
