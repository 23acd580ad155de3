"""Which UNet parameters each erasure method trains: one table (Gandikota et al. 2023, Sec. 4).

Cross-attention only (ESD-x) ties the erasure to the prompt's words, right for artist styles; everything
but cross-attention (ESD-u) erases the concept globally, right for nudity and objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    selects: Callable[[str], bool]


def _xattn(n: str) -> bool:
    return ".attn2." in n


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("esd-x", "cross-attention (attn2): erasure tied to the prompt's words; for styles", _xattn),
    Method("esd-x-strict", "cross-attention keys and values only (attn2.to_k, attn2.to_v)",
           lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n),
    Method("esd-u", "everything but cross-attention and the time embedding: global erasure; for objects, nudity",
           lambda n: not _xattn(n) and not n.startswith("time_embedding.")),
    Method("esd-all", "every UNet parameter", lambda n: True),
    Method("selfattn", "self-attention (attn1)", lambda n: ".attn1." in n),
]}

DEFAULT_BY_KIND = {"style": "esd-x", "object": "esd-u", "nudity": "esd-u", "custom": "esd-u"}


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
