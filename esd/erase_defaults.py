"""The operator's erase settings: ESD_ERASE_DEFAULTS, a JSON object of the same shape as a base folder's
esd_defaults.json ({"<method>": {"<setting>": value, or {"style": value, "object": value, "*": value}}}), laid over
the base's defaults for every takedown and retrain this worker runs, and for every erasure of `esd bench quality` (so a
candidate default is measured as takedowns would run it). A request's own settings still come first.

For example ESD_ERASE_DEFAULTS='{"uce-tokens-adv": {"attack_steps": 30}}' halves the style default's textual
inversion on a slow machine; '{"esd-u-retain": {"iterations": {"object": 300}}}' trains object erasures longer on a
GPU. What a version was made with is in its manifest, whichever layer set it. Like the gate's settings, they are
checked at `esd stack up` and when a flow starts, and a bad one is refused naming the method and the setting.
"""

from __future__ import annotations

import json
import os

from esd.erase import EraseConfig, EraseError, for_kind
from esd.methods import DEFAULT_BY_KIND, METHODS

ENV = "ESD_ERASE_DEFAULTS"
KINDS = tuple(DEFAULT_BY_KIND)


class EraseDefaultsError(ValueError):
    """Operator erase settings that cannot be used; one line naming the method and the setting."""


def load() -> dict[str, dict]:
    """ESD_ERASE_DEFAULTS, checked: every method known, every setting one a request could give, valid for each kind."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EraseDefaultsError(f"{ENV} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EraseDefaultsError(f"{ENV} must map methods to settings, got {type(value).__name__}")
    for method, settings in value.items():
        if method not in METHODS:
            raise EraseDefaultsError(f"{ENV}: unknown method {method!r}; choose from: {', '.join(METHODS)}")
        if not isinstance(settings, dict):
            raise EraseDefaultsError(f"{ENV}: {method} must map settings to values, got {type(settings).__name__}")
        if "concept_kind" in settings:
            raise EraseDefaultsError(f"{ENV}: {method}: concept_kind is the request's, not a default")
        for kind in KINDS:
            try:
                EraseConfig.with_overrides(["concept"], method, for_kind(settings, kind) | {"concept_kind": kind})
            except (EraseError, TypeError, ValueError) as exc:
                raise EraseDefaultsError(f"{ENV}: {method} ({kind}): {exc}") from None
    return value


def settings(method: str, kind: str, overrides: dict | None = None, defaults: dict[str, dict] | None = None) -> dict:
    """The erase settings of a request: its kind, the operator's defaults for its method and kind (`defaults`, as
    load() returned them; read now if not given), its own overrides."""
    defaults = load() if defaults is None else defaults
    own = {k: v for k, v in for_kind(defaults.get(method, {}), kind).items() if v is not None}
    return {"concept_kind": kind} | own | (overrides or {})
