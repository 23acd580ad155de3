"""The fault suite's ledger: the rows of its table and the bad-input counts, kept as files under the run's temporary
root, and the table printed at the end of the run (`summary`, called from tests/conftest.py, which the controlling
process of a multi-worker run loads too)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


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


def ledger_for(factory) -> Ledger:
    base = factory.getbasetemp()
    return Ledger((base.parent if base.name.startswith("popen-gw") else base) / "esd-faults")


def summary(terminalreporter) -> None:
    ledger = ledger_for(terminalreporter.config._tmp_path_factory)
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
