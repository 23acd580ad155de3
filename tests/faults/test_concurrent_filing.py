"""Concurrent submissions on the scale-out backend (MLflow on PostgreSQL): twenty filings at once, every request id
filed twice, give one record per id."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

from flows.platform import Platform
from flows.requests import Request
from tests.faults.conftest import audit


def test_twenty_concurrent_submissions_on_postgresql(pg_stack, ledger):
    platform = Platform(pg_stack)
    model = f"toy-{uuid.uuid4().hex[:6]}"
    ids = [f"req-{uuid.uuid4().hex[:10]}" for _ in range(10)]
    concepts = ["circle", "square", "Vela Moreau", "Otto Kerr", "triangle"]

    def file(i: int):
        rid = ids[i % 10]
        concept = concepts[ids.index(rid) % len(concepts)]
        return platform.requests.file(Request(concept, "style" if concept[0].isupper() else "object", model,
                                              request_id=rid).validate())

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(file, range(20)))
    assert sum(new for _, new in results) == 10                 # each id filed once ...
    for rid in ids:                                             # ... and both callers got that one record
        assert len({r.run_id for r, _ in results if r.request_id == rid}) == 1
    records = platform.requests.list(model=model, max_results=None)
    assert sorted(r.request_id for r in records) == sorted(ids)
    row = audit(platform, model, [])                            # filed, not run: no outcome to wait for
    # lost: an id with no record, or a second record of one id
    row |= {"requests": 20, "lost": len(set(ids) - {r.request_id for r in records}) + len(records) - len(ids)}
    ledger.record("20 concurrent submissions (10 ids, each twice) on PostgreSQL", row)
    assert (row["lost"], row["half_made"], row["wrong_aliases"]) == (0, 0, 0), row


def test_a_claim_whose_filer_died_is_superseded(stack):
    platform = Platform(stack)
    rid = f"req-{uuid.uuid4().hex[:10]}"
    # a filer that claimed the id and died before writing the record
    platform.requests.client.create_experiment(f"takedown-requests/ids/{rid}#1")
    record, new = platform.requests.file(Request("circle", "object", "toy-sd", request_id=rid).validate(), stale=0.5)
    assert new and record.request_id == rid and platform.requests.file(record)[1] is False
