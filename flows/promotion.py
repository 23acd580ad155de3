"""The one way production moves: the takedown, the retrain, the operator flows and the CLI all call these.

promote: the gate check (an erased version that did not pass needs force), the stored files verified, the alias
moved, the move recorded in the history (registry.aliases), and the requests the version serves moved to
promoted. rollback: production back to an earlier version, recorded the same way.
"""

from __future__ import annotations

import json

from flows.platform import Platform
from infra.errors import require_reason
from infra.settings import actor as actor_name


def promote(platform: Platform, model: str, version: int, reason: str, actor: str | None = None,
            alias: str = "production", force: bool = False) -> dict:
    from registry import aliases
    from registry.versions import resolve

    event = aliases.promote(platform.store, model, int(version), require_reason(reason), actor_name(actor),
                            alias=alias, force=force)
    if alias == "production":
        tags = resolve(platform.store, f"{model}/{version}").tags or {}
        platform.requests.promoted_with(int(version), json.loads(tags.get("esd.request_ids", "[]")))
    return event


def rollback(platform: Platform, model: str, reason: str, actor: str | None = None, to: int | None = None) -> dict:
    from registry import aliases

    return aliases.rollback(platform.store, model, require_reason(reason), actor_name(actor), to)
