"""Aliases `production` and `candidate`, moved only onto verified versions, every move recorded.

MLflow keeps no history of alias moves, so each move is written as one registered-model tag,
`esd.history.<time_ns>.<random>` = JSON {time, actor, reason, alias, action, from, to}. Why tags:
- they live in the registry's own database (SQLite or PostgreSQL) beside the aliases they describe, so a
  backup or restore of the registry keeps both consistent, and server restarts keep them;
- one tag per event means no read-modify-write: two concurrent promotions cannot overwrite each other
  (a JSON-lines object in S3 would need a conditional write to be safe);
- they show in the MLflow UI and need no S3 credentials to read.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone

from infra.errors import require_reason
from registry.store import RegistryError, Store
from registry.versions import GATE_TAG, model_name, resolve, verify

ALIASES = ("production", "candidate")
HISTORY_PREFIX = "esd.history."
MAX_REASON = 2000


def history(store: Store, name: str) -> list[dict]:
    """Every alias move of NAME, oldest first."""
    tags = store.mlflow().get_registered_model(model_name(name)).tags or {}
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(HISTORY_PREFIX))]


def current(store: Store, name: str, alias: str = "production") -> int | None:
    """The version ALIAS points at, or None."""
    aliases = store.mlflow().get_registered_model(name).aliases or {}
    return int(aliases[alias]) if alias in aliases else None


def _move(store: Store, name: str, alias: str, version: int, reason: str, actor: str, action: str) -> dict:
    if alias not in ALIASES:
        raise RegistryError(f"unknown alias {alias!r}; use one of: {', '.join(ALIASES)}")
    reason = require_reason(reason)
    version = int(resolve(store, f"{name}/{version}").version)
    verify(store, name, version)    # never point an alias at files that are missing or changed
    before = current(store, name, alias)
    event = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "actor": actor,
             "reason": reason[:MAX_REASON], "alias": alias, "action": action, "from": before, "to": version}
    if before == version:
        return event | {"changed": False}
    client = store.mlflow()
    client.set_registered_model_alias(name, alias, str(version))
    try:
        client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{time.time_ns():020d}.{secrets.token_hex(3)}",
                                        json.dumps(event))
    except Exception as exc:
        # An unrecorded move is not allowed: put the alias back.
        if before is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, str(before))
        raise RegistryError(f"could not record the move of {alias}, alias left at {before}: {exc}") from None
    return event | {"changed": True}


def promote(store: Store, name: str, version: int | str, reason: str, actor: str, alias: str = "production",
            force: bool = False) -> dict:
    """Point ALIAS at VERSION after verifying its stored files (and its base's) in S3.

    Production takes an erased version only if it passed its gate (tag esd.gate); force overrides that, and
    the history records the move as forced.
    """
    reason = require_reason(reason)        # before "forced past gate" is added to it
    if alias == "production":
        tags = resolve(store, f"{name}/{version}").tags or {}
        gate = tags.get(GATE_TAG)
        if tags.get("esd.kind") == "erased" and gate != "passed":
            if not force:
                raise RegistryError(f"{name} v{version} has not passed its gate (gate: {gate or 'not evaluated'}); "
                                    "use --force with a reason to promote it anyway")
            reason = f"forced past gate {gate or 'not evaluated'}: {reason}"
    return _move(store, name, alias, int(version), reason, actor, "promote")


def previous_production(store: Store, name: str) -> int | None:
    """The production version before the current one, skipping versions already rolled back from.

    Replays the history as a stack: a promotion pushes, a rollback pops back to its target. So after
    1 -> 2 -> 3 and a rollback to 2, the next default rollback goes to 1, not back to 3.
    """
    stack: list[int] = []
    for e in history(store, name):
        if e["alias"] != "production":
            continue
        if e["action"] == "rollback" and e["to"] in stack:
            del stack[len(stack) - stack[::-1].index(e["to"]):]
        else:
            stack.append(e["to"])
    return stack[-2] if len(stack) >= 2 else None


def rollback(store: Store, name: str, reason: str, actor: str, to: int | str | None = None) -> dict:
    """Move production back to TO, by default to the previous production version."""
    reason = require_reason(reason)
    target = int(to) if to is not None else previous_production(store, name)
    if target is None:
        raise RegistryError(f"{name} has no earlier production version to roll back to")
    return _move(store, name, "production", target, reason, actor, "rollback")
