"""The one way production moves: the takedown, the retrain, the operator flows and the CLI all call these.

promote: the gate check (an erased version that did not pass needs force), the stored files verified, the alias
moved, the move recorded in the history (registry.aliases), and the requests the version serves moved to
promoted. rollback: production back to an earlier version, recorded the same way.
"""

from __future__ import annotations

import json

from flows.platform import Platform
from infra.settings import actor as actor_name


class ProductionMoved(RuntimeError):
    """Production is no longer the version a run started from: promoting would drop what moved it."""


def promote(platform: Platform, model: str, version: int, reason: str, actor: str | None = None,
            alias: str = "production", force: bool = False, expected: int | None = None) -> dict:
    """EXPECTED: the production version the caller's work was built on (a takedown's parent, what a retrain saw);
    if production has moved since, nothing moves and ProductionMoved says so, so no erasure is silently lost."""
    from registry import aliases
    from registry.versions import resolve

    if alias == "production" and expected is not None:
        now = aliases.current(platform.store, model)
        if now is not None and now != int(expected):
            raise ProductionMoved(f"production of {model} moved from v{expected} to v{now} while this run "
                                  f"worked; v{version} was built on v{expected} and is held for review")
    who = actor_name(actor)
    event = aliases.promote(platform.store, model, int(version), reason, who, alias=alias, force=force)
    if alias == "production":
        tags = resolve(platform.store, f"{model}/{version}").tags or {}
        platform.requests.promoted_with(int(version), json.loads(tags.get("esd.request_ids", "[]")),
                                        f"{who}: {reason}")
        unserved(platform, model, int(version))
    return event


def rollback(platform: Platform, model: str, reason: str, actor: str | None = None, to: int | None = None) -> dict:
    from registry import aliases

    event = aliases.rollback(platform.store, model, reason, actor_name(actor), to)
    unserved(platform, model, int(event["to"]))
    return event


def unserved(platform: Platform, model: str, production: int) -> list[str]:
    """Promoted requests whose concept the new production no longer erases become held, with the reason: an
    operator's rollback is never a silent undoing of a takedown. Returns their ids."""
    from registry.versions import show

    erased = {c.casefold() for c in show(platform.store, model, production)["erased"]}
    held = []
    for r in platform.requests.list("promoted", model, max_results=None):
        if r.concept.casefold() not in erased:
            platform.requests.update(r.request_id, "held", reason=f"production moved to v{production}, which does "
                                                                  f"not erase {r.concept!r}; needs review")
            held.append(r.request_id)
    return held
