"""Request records and the one promotion path, on real S3 and MLflow servers (no Prefect needed): allowed moves
only, a withdrawal that wins, retries, and production that never moves under a run that started elsewhere."""

from __future__ import annotations

import uuid

import pytest

import registry
from flows import promotion
from flows.platform import Platform
from flows.requests import Request, RequestError
from infra.errors import ReasonRequired
from tests.registry.deltas import make_delta, mark_gate


@pytest.fixture(scope="module")
def platform(stack) -> Platform:
    return Platform(stack)


def filed(platform: Platform, concept: str = "Vela Moreau", kind: str = "style", model: str = "toy-sd") -> Request:
    record, new = platform.requests.file(Request(concept=concept, kind=kind, model=model,
                                                 request_id=f"req-{uuid.uuid4().hex[:8]}").validate())
    assert new and record.status == "received"
    return record


def test_a_request_moves_only_along_its_lifecycle(platform):
    reqs = platform.requests
    r = filed(platform)
    for status in ("running", "running", "candidate", "promoted"):      # the same status again is no move
        assert reqs.update(r.request_id, status).status == status
    for bad in ("running", "received", "candidate", "failed"):
        with pytest.raises(RequestError, match=f"is promoted; it cannot become {bad}"):
            reqs.update(r.request_id, bad)
    assert reqs.update(r.request_id, "held").status == "held"          # its version left production
    assert reqs.withdraw(r.request_id, "artist withdrew", "ops").status == "withdrawn"
    with pytest.raises(RequestError, match="is withdrawn; it cannot become promoted"):
        reqs.update(r.request_id, "promoted")
    assert reqs.withdraw(r.request_id, "again", "ops").status == "withdrawn"     # idempotent
    with pytest.raises(ReasonRequired):
        reqs.withdraw(filed(platform).request_id, "  ", "ops")


def test_a_withdrawal_during_a_run_wins(platform):
    reqs = platform.requests
    r = filed(platform)
    reqs.start(r.request_id, "flow-run-1")
    reqs.withdraw(r.request_id, "requester withdrew mid-run", "ops")
    with pytest.raises(RequestError, match="cannot become candidate"):
        reqs.update(r.request_id, "candidate", model_version=2)           # what the run would do next
    reqs.fail([r.request_id], RuntimeError("the run broke afterwards"))   # and its failure handler
    got = reqs.require(r.request_id)
    assert got.status == "withdrawn" and got.model_version is None
    with pytest.raises(RequestError, match="was withdrawn"):
        reqs.start(r.request_id, "flow-run-2")


def test_a_failed_request_comes_back_only_by_retry(platform):
    reqs = platform.requests
    r = filed(platform)
    with pytest.raises(RequestError, match="only a failed request can be retried"):
        reqs.retry(r.request_id)
    reqs.start(r.request_id, "flow-run-1")
    reqs.fail([r.request_id], RuntimeError("worker killed\nTraceback ..."))
    failed = reqs.require(r.request_id)
    assert (failed.status, failed.reason) == ("failed", "worker killed")
    with pytest.raises(RequestError, match="is failed; it cannot become running"):
        reqs.start(r.request_id, "flow-run-2")
    again = reqs.retry(r.request_id)
    assert (again.status, again.attempt, again.reason) == ("received", "2", "retried")
    assert reqs.start(r.request_id, "flow-run-2").status == "running"
    promoted = filed(platform)
    reqs.update(promoted.request_id, "running")
    reqs.update(promoted.request_id, "candidate")
    reqs.update(promoted.request_id, "promoted")
    reqs.fail([promoted.request_id], RuntimeError("a report failed after promotion"))
    assert reqs.require(promoted.request_id).status == "promoted"


def test_a_cancellation_wrapped_by_a_library_still_reads_as_a_termination(platform):
    """Prefect's SIGTERM raised inside a lazy import comes out as the library's RuntimeError ("Failed to import
    ..."), raised from it: the request's reason names the termination, not the import."""
    from prefect.exceptions import TerminationSignal

    reqs = platform.requests
    r = filed(platform)
    reqs.start(r.request_id, "flow-run-1")
    try:
        try:
            raise TerminationSignal(signal=15)
        except TerminationSignal as signal:
            raise RuntimeError("Failed to import diffusers.pipelines.onnx_utils because of the following error") \
                from signal
    except RuntimeError as wrapped:
        reqs.fail([r.request_id], wrapped)
    failed = reqs.require(r.request_id)
    assert failed.status == "failed" and failed.reason == "the run was terminated (cancelled, or its worker stopped)"
    other = filed(platform)
    reqs.start(other.request_id, "flow-run-1")
    reqs.fail([other.request_id], RuntimeError("Failed to import x"))       # no termination behind it
    assert reqs.require(other.request_id).reason == "Failed to import x"


@pytest.fixture
def line(platform, tiny_sd, tmp_path):
    """A model with v1 = tiny base (production) and v2 = an erasure serving one candidate request."""
    name = f"toy-{uuid.uuid4().hex[:6]}"
    registry.import_base(platform.store, tiny_sd, name)
    promotion.promote(platform, name, 1, "base line", "ops")
    req = filed(platform, model=name)
    platform.requests.start(req.request_id, "run")
    registry.register_erased(platform.store, name, make_delta(tiny_sd, tmp_path / "d2", ["Vela Moreau"], seed=1,
                                                              request_ids=[req.request_id]))
    platform.requests.update(req.request_id, "candidate", model_version=2)
    return name, req


def test_promotion_moves_the_versions_requests_and_refuses_a_failed_gate(platform, line):
    name, req = line
    with pytest.raises(registry.RegistryError, match="has not passed its gate"):
        promotion.promote(platform, name, 2, "takedown", "flow")
    with pytest.raises(ReasonRequired):                  # forcing past the gate needs a reason all the more
        promotion.promote(platform, name, 2, "  ", "ops", force=True)
    assert registry.resolve(platform.store, f"{name}@production").version == "1"
    assert platform.requests.require(req.request_id).status == "candidate"
    mark_gate(platform.store, name, 2)
    event = promotion.promote(platform, name, 2, "takedown: gate passed", "flow", expected=1)
    assert (event["from"], event["to"], event["changed"]) == (1, 2, True)
    got = platform.requests.require(req.request_id)
    assert (got.status, got.model_version) == ("promoted", "2")


def test_production_that_moved_under_a_run_is_not_overwritten(platform, line, tiny_sd, tmp_path):
    name, req = line
    mark_gate(platform.store, name, 2)
    # v3 was built on v1 by a run that started before v2 was promoted: promoting it would drop v2's erasure
    registry.register_erased(platform.store, name, make_delta(tiny_sd, tmp_path / "d3", ["circle"], seed=2))
    mark_gate(platform.store, name, 3)
    promotion.promote(platform, name, 2, "first takedown", "flow", expected=1)
    history = registry.history(platform.store, name)
    with pytest.raises(promotion.ProductionMoved, match="moved from v1 to v2"):
        promotion.promote(platform, name, 3, "second takedown", "flow", expected=1)
    assert registry.resolve(platform.store, f"{name}@production").version == "2"
    assert registry.history(platform.store, name) == history
    # an operator's promotion (no expected parent) still decides
    assert promotion.promote(platform, name, 3, "reviewed: v3 replaces v2", "ops")["to"] == 3


def test_a_retrain_gathers_every_active_request_of_its_model_page_by_page(platform, monkeypatch):
    import flows.requests

    monkeypatch.setattr(flows.requests, "PAGE", 2)
    model = f"toy-{uuid.uuid4().hex[:6]}"
    moves = {"promoted": ["running", "candidate", "promoted"], "held": ["running", "held"],
             "candidate": ["running", "candidate"], "failed": ["running", "failed"], "received": []}
    made = {}
    for i, (final, path) in enumerate(list(moves.items()) * 2):
        r = filed(platform, concept=f"circle {i}", kind="object", model=model)
        for status in path:
            platform.requests.update(r.request_id, status)
        made[r.request_id] = final
    filed(platform, model=model + "-other")                                   # another model's request
    platform.requests.withdraw(next(k for k, v in made.items() if v == "promoted"), "withdrawn", "ops")
    active = {r.request_id for r in platform.requests.active(model)}
    expected = {k for k, v in made.items() if v in ("promoted", "held", "candidate")}
    assert len(expected) == 6 and active == expected - {next(k for k, v in made.items() if v == "promoted")}
    assert len(platform.requests.list(model=model, max_results=None)) == 10
    assert len(platform.requests.list(model=model, max_results=3)) == 3
