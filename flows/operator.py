"""Operator flows: promote, rollback, withdraw. Each moves one thing, records who and why, and checks first;
the same functions the CLI calls (flows.promotion, flows.requests)."""

from __future__ import annotations

from prefect import flow

from flows import promotion
from flows.deploy import lineage_slot
from flows.platform import Platform


@flow(name="promote", log_prints=True)
def promote(model: str, version: int, reason: str, actor: str, force: bool = False) -> dict:
    """Point production at VERSION; a version that failed its gate needs force and a reason."""
    with lineage_slot(model):
        return promotion.promote(Platform(), model, version, reason, actor, force=force)


@flow(name="rollback", log_prints=True)
def rollback(model: str, reason: str, actor: str, to: int | None = None) -> dict:
    """Move production back to TO, by default the previous production version."""
    with lineage_slot(model):
        return promotion.rollback(Platform(), model, reason, actor, to)


@flow(name="withdraw", log_prints=True)
def withdraw(request_id: str, reason: str, actor: str) -> dict:
    """Withdraw (or reject) a request: excluded from the next retrain; the versions already made are kept."""
    return vars(Platform().requests.withdraw(request_id, reason, actor))
