"""The fault suite: faults injected into real servers and processes (killed, restarted, cancelled, raced), then
the platform audited: every affected request ends in a recorded outcome, every version is whole, production
erases what its promoted requests promised. `make faults` runs this directory and prints the table."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.platform import Platform


@dataclass
class Ledger:
    """Rows of the fault table and counts of the bad-input corpus, kept as files under the run's temporary root,
    so that the summary sees them however many pytest workers (xdist) wrote them."""
    root: Path

    def record(self, fault: str, audited: dict) -> dict:
        self._write("rows", {"fault": fault} | audited)
        return audited

    def bad_input(self, cases: int, refused: int, writes: int) -> None:
        self._write("bad-input", {"cases": cases, "refused": refused, "writes": writes})

    def _write(self, kind: str, row: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{kind}-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def read(self, kind: str) -> list[dict]:
        return [json.loads(line) for p in sorted(self.root.glob(f"{kind}-*.jsonl")) for line in p.read_text().splitlines()]


def _ledger(factory) -> Ledger:
    base = factory.getbasetemp()
    return Ledger((base.parent if base.name.startswith("popen-gw") else base) / "esd-faults")


@pytest.fixture
def ledger(tmp_path_factory) -> Ledger:
    return _ledger(tmp_path_factory)


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
    ledger = _ledger(terminalreporter.config._tmp_path_factory)
    rows, bad = ledger.read("rows"), ledger.read("bad-input")
    if not rows and not bad:
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
    for b in bad:
        w(f"bad input: {b['cases']} cases, {b['refused']} refused cleanly, {b['writes']} writes")
