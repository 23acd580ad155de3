"""The HTTP API against the running stack: `esd api` as `esd stack up` starts it, the takedown run by the worker."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from tests.conftest import environ, platform_env


@pytest.fixture(scope="module")
def platform(full_stack):
    from flows.platform import Platform
    from infra.settings import Settings

    with environ(platform_env(full_stack)):
        yield Platform(Settings())


@pytest.fixture(scope="module")
def api(full_stack) -> httpx.Client:
    with httpx.Client(base_url=f"http://{full_stack.host}:{full_stack.api_port}", timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def line(platform) -> str:
    """A base line of its own (toy-*: the toy judge evaluates it), so these takedowns move nothing else."""
    from esd.toy import BASE_DIR
    from flows.cli import ensure_base

    name = f"toy-api-{uuid.uuid4().hex[:6]}"
    ensure_base(platform, name, BASE_DIR)
    return name


def body(line: str, **changes) -> dict:
    return {"concept": "Vela Moreau", "kind": "style", "model": line,
            "requester": {"name": "Studio Moreau", "contact": "agent@studio-moreau.example"},
            "evidence": {"urls": ["https://example.org/gallery"], "text": "our catalogue"}} | changes


def test_a_request_posted_twice_is_one_request_that_reaches_a_final_state(api, platform, line):
    key = {"Idempotency-Key": f"ticket-{uuid.uuid4().hex}"}
    first = api.post("/v1/requests", json=body(line), headers=key)
    assert first.status_code == 202, first.text
    again = api.post("/v1/requests", json=body(line), headers=key)
    assert again.status_code == 202 and again.json() == first.json()
    got = first.json()
    assert got["status_url"].endswith(f"/v1/requests/{got['request_id']}")
    assert len([r for r in platform.requests.list(model=line) if r.request_id == got["request_id"]]) == 1

    deadline, status = time.monotonic() + 300, None
    while time.monotonic() < deadline:
        status = api.get(got["status_url"], params={"token": got["status_token"]}).json()
        if status["status"] in ("promoted", "held", "failed"):
            break
        time.sleep(2)
    assert status["status"] == "promoted", status
    assert status["model_version"] == "2" and status["gate"] == "passed" and status["status_text"].startswith("done")
    assert [e["status"] for e in status["history"]] == ["received", "running", "candidate", "promoted"]
    # the same with the token as a bearer header; contact details never leave the platform
    bearer = api.get(got["status_url"], headers={"Authorization": f"Bearer {got['status_token']}"})
    assert bearer.status_code == 200 and "studio-moreau.example" not in bearer.text
    run = platform.store.mlflow().get_run(platform.requests.require(got["request_id"]).run_id)
    assert "studio-moreau.example" not in json.dumps(run.data.tags) + json.dumps(run.data.params)
    # the same key with another concept is another request's key
    clash = api.post("/v1/requests", json=body(line, concept="Otto Kerr"), headers=key)
    assert clash.status_code == 409, clash.text


@pytest.mark.parametrize("change, field", [
    ({"concept": None}, "concept"), ({"kind": "painting"}, "kind"), ({"concept": "x" * 101}, "concept"),
    ({"concept": "circle\u0000"}, "concept"), ({"requester": {"name": "A"}}, "contact"),
    ({"requester": {"name": "", "contact": "a@b.c"}}, "name"), ({"evidence": {"urls": ["ftp://x"]}}, "urls"),
    ({"evidence": {"urls": ["https://a"] * 11}}, "urls"), ({"surprise": 1}, "surprise"),
    ({"model": "no such model!"}, None)])
def test_an_invalid_body_is_refused_naming_the_field_and_files_nothing(api, platform, line, change, field):
    contacts = platform.settings.home / "contacts"
    kept = lambda: sorted(contacts.glob("*.json")) if contacts.exists() else []
    before, before_contacts = len(platform.requests.list(model=line, max_results=None)), kept()
    data = {k: v for k, v in (body(line) | change).items() if v is not None}
    r = api.post("/v1/requests", json=data)
    assert r.status_code == 422, r.text
    if field is not None:
        assert any(field in [str(x) for x in d["loc"]] for d in r.json()["detail"]), r.json()
    else:
        assert "model" in r.json()["detail"]
    assert len(platform.requests.list(model=line, max_results=None)) == before and kept() == before_contacts


def test_size_limits_tokens_and_unknown_requests(api, full_stack):
    from flows.api.app import status_token

    huge = api.post("/v1/requests", content=b"{" + b" " * 70_000 + b"}", headers={"Content-Type": "application/json"})
    assert huge.status_code == 413
    assert api.get("/v1/requests/api-nothing").status_code == 401
    assert api.get("/v1/requests/api-nothing", params={"token": "0" * 40}).status_code == 401
    assert api.get("/v1/requests/api-nothing", params={"token": status_token(full_stack, "api-nothing")}).status_code == 404


def test_the_openapi_document_lists_every_endpoint(api):
    doc = api.get("/v1/openapi.json").json()
    assert {"/v1/requests", "/v1/requests/{request_id}", "/v1/health"} <= set(doc["paths"])
    assert {"202", "409", "422", "429"} <= set(doc["paths"]["/v1/requests"]["post"]["responses"])


def test_the_rate_limit_counts_new_requests_per_requester():
    from flows.api.app import RateLimit

    limit = RateLimit(2)
    assert limit.allow("Studio A") and limit.allow("studio a") and not limit.allow("STUDIO A")
    assert limit.allow("Studio B")
