"""The fault suite: faults injected into real servers and processes (killed, restarted, cancelled, raced), then
the platform audited: every affected request ends in a recorded outcome, every version is whole, production
erases what its promoted requests promised. `make faults` runs this directory and prints the table."""

from __future__ import annotations

import pytest

from flows.platform import Platform
from tests.ledger import Ledger, ledger_for


@pytest.fixture
def ledger(tmp_path_factory) -> Ledger:
    return ledger_for(tmp_path_factory)


def audit(platform: Platform, model: str, request_ids: list[str]) -> dict:
    """What a fault left behind on MODEL for the requests it touched.

    lost: a request with no record, still received or running once its run is over, or failed without a reason.
    half_made: a version of MODEL whose stored files do not verify against its registry tag.
    wrong_aliases: production missing or broken, or not erasing the concept of a promoted request of MODEL."""
    from mlflow.exceptions import MlflowException

    from registry import aliases
    from registry.store import IntegrityError, RegistryError
    from registry.versions import list_versions, show, verify

    lost = 0
    for rid in request_ids:
        r = platform.requests.get(rid)
        lost += r is None or r.status in ("received", "running") or (r.status == "failed" and not r.reason)
    try:
        rows = list_versions(platform.store, model)
    except (RegistryError, MlflowException):
        rows = []                                    # no such model: nothing registered, nothing half-made
    half_made = 0
    for row in rows:
        try:
            verify(platform.store, model, row["version"])
        except (IntegrityError, RegistryError):
            half_made += 1
    wrong = 0
    production = aliases.current(platform.store, model) if rows else None
    promoted = platform.requests.list("promoted", model, max_results=None)
    if production is None:
        wrong += bool(promoted)
    else:
        erased = {c.casefold() for c in show(platform.store, model, production)["erased"]}
        wrong += sum(r.concept.casefold() not in erased for r in promoted)
        try:
            verify(platform.store, model, production)
        except (IntegrityError, RegistryError):
            wrong += 1
    return {"requests": len(request_ids), "lost": lost, "half_made": half_made, "wrong_aliases": wrong}
