"""The Stable Diffusion architectures the engine knows, named once and light to import: the command lines build their
choices from these names without loading torch."""

from __future__ import annotations

from enum import Enum

SINGLE_FILE = ("sd15", "sd21", "sd21-v", "sdxl")     # what a single-file checkpoint can be read as or written from
TINY = ("sd15", "sd21-v", "sdxl")                   # what `esd toy tiny` makes (SD 2.x's layout at v prediction)


def known(arch: str, names: tuple[str, ...] = SINGLE_FILE) -> str:
    """ARCH if it is one of NAMES, else ValueError naming the choices."""
    if arch not in names:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(names)}")
    return arch


def choices(name: str, names: tuple[str, ...]) -> type[Enum]:
    """A command line's choice of NAMES (members sd21_v = "sd21-v" and so on)."""
    return Enum(name, {n.replace("-", "_"): n for n in names}, type=str)
