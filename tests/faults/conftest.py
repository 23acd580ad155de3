"""The fault suite: faults injected into real servers and processes (killed, restarted, cancelled, raced), then
the platform audited: every affected request ends in a recorded outcome, every version is whole, production
erases what its promoted requests promised. `make faults` runs this directory and prints the table."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from flows.platform import Platform


@dataclass
class Ledger:
    rows: list[dict] = field(default_factory=list)
    bad_input: dict[str, int] = field(default_factory=lambda: {"cases": 0, "refused": 0, "writes": 0})

    def record(self, fault: str, audited: dict) -> dict:
        self.rows.append({"fault": fault} | audited)
        return audited


LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


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


def pytest_terminal_summary(terminalreporter) -> None:
    rows, bad = LEDGER.rows, LEDGER.bad_input
    if not rows and not bad["cases"]:
        return
    w = terminalreporter.write_line
    w("")
    w("| fault injected | requests affected | requests lost | versions half-made | aliases wrong |")
    w("|---|---|---|---|---|")
    for r in rows:
        w(f"| {r['fault']} | {r['requests']} | {r['lost']} | {r['half_made']} | {r['wrong_aliases']} |")
    if rows:
        w(f"faults: {len(rows)} injected, {sum(r['lost'] for r in rows)} requests lost, "
          f"{sum(r['half_made'] for r in rows)} half-made versions, {sum(r['wrong_aliases'] for r in rows)} "
          "wrong aliases")
    if bad["cases"]:
        w(f"bad input: {bad['cases']} cases, {bad['refused']} refused cleanly, {bad['writes']} writes")
