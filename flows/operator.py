"""Operator flows: promote, rollback, withdraw. Each moves one thing, records who and why, and checks first;
the same functions the CLI calls (flows.promotion, flows.requests).

Only a holder of the Prefect API credential (the platform's administrator) can start a flow run, and Prefect does not
say who that was: each move is recorded under the flow's own name (flow:promote, ...), never under a name passed in
as a parameter. An operator who acts under their own name uses `esd promote` / the API with their token."""

from __future__ import annotations

from prefect import flow

from flows import promotion
from flows.deploy import lineage_slot
from flows.platform import Platform
from flows.tasks import flow_actor


@flow(name="promote", log_prints=True)
def promote(model: str, version: int, reason: str, force: bool = False) -> dict:
    """Point production at VERSION; a version that failed its gate needs force and a reason."""
    with lineage_slot(model):
        return promotion.promote(Platform(), model, version, reason, flow_actor(), force=force)


@flow(name="rollback", log_prints=True)
def rollback(model: str, reason: str, to: int | None = None) -> dict:
    """Move production back to TO, by default the previous production version."""
    with lineage_slot(model):
        return promotion.rollback(Platform(), model, reason, flow_actor(), to)


@flow(name="withdraw", log_prints=True)
def withdraw(request_id: str, reason: str) -> dict:
    """Withdraw (or reject) a request: excluded from the next retrain; the versions already made are kept."""
    return vars(Platform().requests.withdraw(request_id, reason, flow_actor()))
