"""The HTTP API against the running stack: `esd api` as `esd stack up` starts it, the takedown run by the worker."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest



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


@pytest.fixture(scope="module")
def promoted(api, platform, line) -> dict:
    """A request filed through the API (twice, one key) and followed to its final state: what it returned."""
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
        time.sleep(0.5)
    return got | {"status": status, "key": key}


def test_a_request_posted_twice_is_one_request_that_reaches_a_final_state(api, platform, line, promoted):
    got, status, key = promoted, promoted["status"], promoted["key"]
    assert status["status"] == "promoted", status
    assert status["model_version"] == "2" and status["gate"] == "passed" and status["status_text"].startswith("done")
    assert [e["status"] for e in status["history"]] == ["received", "running", "candidate", "promoted"]
    # the style default ran on the worker with the operator's erase settings, and the version's manifest records them
    from registry.load import version_files
    from tests.conftest import SHORT_ERASE

    erasure = version_files(platform.store, f"{line}/{status['model_version']}")[1].manifest["erasures"][-1]
    assert erasure["method"] == "uce-tokens-adv" and len(erasure["hyperparameters"]["soft_tokens"]["Vela Moreau"]) == 2
    assert erasure["hyperparameters"]["attack_steps"] == SHORT_ERASE["uce-tokens-adv"]["attack_steps"]
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
    assert {"/v1/requests", "/v1/requests/{request_id}", "/v1/health", "/v1/requests/{request_id}/promote",
            "/v1/requests/{request_id}/hold", "/v1/requests/{request_id}/withdraw", "/v1/models/{name}",
            "/v1/models/{name}/rollback", "/v1/webhooks", "/v1/webhooks/{webhook_id}"} == set(doc["paths"])
    assert {"202", "409", "422", "429"} <= set(doc["paths"]["/v1/requests"]["post"]["responses"])


def test_the_rate_limit_counts_new_requests_per_requester():
    from flows.api.app import RateLimit

    limit = RateLimit(2)
    assert limit.allow("Studio A") and limit.allow("studio a") and not limit.allow("STUDIO A")
    assert limit.allow("Studio B")


class Receiver:
    """A webhook receiver on a free local port: records each POST; the first FAIL of them get HTTP 500."""

    def __init__(self, fail: int = 0):
        import http.server
        import threading

        self.got, self.fail = [], fail
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.fail > 0:
                    outer.fail -= 1
                    self.send_response(500)
                else:
                    outer.got.append((body, self.headers["X-ESD-Signature"]))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def test_webhooks_deliver_every_status_change_signed_and_retry(api, promoted):
    from flows.api.webhooks import sign

    rid, token = promoted["request_id"], promoted["status_token"]
    assert api.post("/v1/webhooks", json={"url": "ftp://x", "request_id": rid, "token": token}).status_code == 422
    assert api.post("/v1/webhooks", json={"url": "http://127.0.0.1:1/x", "request_id": rid}).status_code == 401
    assert api.post("/v1/webhooks", json={"url": "http://127.0.0.1:1/x"}).status_code == 401     # every request
    steady, flaky = Receiver(), Receiver(fail=2)
    subs = [api.post("/v1/webhooks", json={"url": r.url, "request_id": rid, "token": token}) for r in (steady, flaky)]
    assert all(s.status_code == 201 for s in subs), subs[0].text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(steady.got) < 4 or len(flaky.got) < 4):
        time.sleep(1)
    for receiver, sub in zip((steady, flaky), subs):
        events = [json.loads(body) for body, _ in receiver.got]
        assert [e["status"] for e in events][:4] == ["received", "running", "candidate", "promoted"], events
        assert all(e["request_id"] == rid and e["event"] == "request.status" for e in events)
        assert all(signature == sign(sub.json()["secret"], body) for body, signature in receiver.got)
        assert "studio-moreau.example" not in json.dumps(events)
    assert flaky.fail == 0          # its first two deliveries failed and were retried


@pytest.fixture(scope="module")
def team(full_stack) -> dict:
    """A submitter, an operator and a reader, with their credentials."""
    from infra import users

    out = {}
    for name, role in (("sam", "submitter"), ("olga", "operator"), ("rita", "reader")):
        user, token = users.add(full_stack, f"{name}-{uuid.uuid4().hex[:4]}", role)
        users.provision(full_stack, user, token)
        out[name] = {"name": user.name, "token": token, "auth": {"Authorization": f"Bearer {token}"}}
    return out


def test_operators_act_under_their_own_name_and_nobody_else_may(api, platform, line, promoted, team):
    from registry import aliases

    rid, sam, olga, rita = promoted["request_id"], team["sam"], team["olga"], team["rita"]
    decision = {"reason": "reviewed the evidence"}
    # nobody, a credential that proves nobody, a submitter and a reader cannot promote, hold or roll back
    assert api.post(f"/v1/requests/{rid}/promote", json=decision).status_code == 401
    assert api.post(f"/v1/requests/{rid}/promote", json=decision,
                    headers={"Authorization": "Bearer esd_not-a-credential"}).status_code == 401
    for who in (sam, rita):
        refused = api.post(f"/v1/requests/{rid}/hold", json=decision, headers=who["auth"])
        assert refused.status_code == 403 and "needs role operator" in refused.json()["detail"], refused.text
        assert api.post(f"/v1/models/{line}/rollback", json=decision, headers=who["auth"]).status_code == 403
    assert platform.requests.require(rid).status == "promoted"

    # an operator: a reason is required; the act is recorded under the operator's user name
    missing = api.post(f"/v1/requests/{rid}/hold", json={"reason": ""}, headers=olga["auth"])
    assert missing.status_code == 422 and "reason" in json.dumps(missing.json()["detail"])
    held = api.post(f"/v1/requests/{rid}/hold", json=decision, headers=olga["auth"])
    assert held.status_code == 200 and held.json()["status"] == "held", held.text
    assert held.json()["reason"] == f"{olga['name']}: reviewed the evidence"
    assert aliases.history(platform.store, line)[-1]["actor"] == "flow:takedown"
    back = api.post(f"/v1/models/{line}/rollback", json={"reason": "regression", "to": 1}, headers=olga["auth"])
    assert back.status_code == 200 and back.json()["to"] == 1, back.text
    assert aliases.history(platform.store, line)[-1]["actor"] == olga["name"]
    # production left its version while it was held; an operator promotes the request back
    assert platform.requests.require(rid).status == "held"
    again = api.post(f"/v1/requests/{rid}/promote", json={"reason": "cleared"}, headers=olga["auth"])
    assert again.status_code == 200, again.text
    assert platform.requests.require(rid).status == "promoted"
    last = aliases.history(platform.store, line)[-1]
    assert (last["actor"], last["reason"], last["from"], last["to"]) == (olga["name"], "cleared", 1, 2)

    # a reader reads the model (versions, aliases, lineage, history); a submitter may not
    model = api.get(f"/v1/models/{line}", headers=rita["auth"])
    assert model.status_code == 200, model.text
    assert model.json()["aliases"]["production"] == 2 and [v["version"] for v in model.json()["versions"]] == [1, 2]
    assert [v["version"] for v in model.json()["production_lineage"]] == [2, 1]
    assert api.get(f"/v1/models/{line}", headers=sam["auth"]).status_code == 403
    assert api.get("/v1/models/no-such-model", headers=rita["auth"]).status_code == 404

    assert api.post(f"/v1/requests/{rid}/withdraw", json={"reason": "artist withdrew"},
                    headers=olga["auth"]).json()["status"] == "withdrawn"
    assert api.post(f"/v1/requests/{rid}/promote", json=decision, headers=olga["auth"]).status_code == 409


def test_a_submitter_sees_their_own_requests_only(api, platform, line, promoted, team):
    from flows.requests import Request

    sam, olga = team["sam"], team["olga"]
    own, _ = platform.requests.file(Request(concept="Otto Kerr", kind="style", model=line,
                                            requester=f"user:{sam['name']}").validate())
    assert api.get(f"/v1/requests/{own.request_id}", headers=sam["auth"]).status_code == 200
    assert api.get(f"/v1/requests/{promoted['request_id']}", headers=sam["auth"]).status_code == 401
    mine = api.get("/v1/requests", headers=sam["auth"])
    assert mine.status_code == 200 and [r["request_id"] for r in mine.json()] == [own.request_id]
    everyone = api.get("/v1/requests", params={"model": line}, headers=olga["auth"]).json()
    assert {own.request_id, promoted["request_id"]} <= {r["request_id"] for r in everyone}
    assert "studio-moreau.example" not in json.dumps(everyone)
    assert api.get("/v1/requests").status_code == 401
    assert api.get("/v1/requests", params={"status": "lost"}, headers=olga["auth"]).status_code == 422
    platform.requests.withdraw(own.request_id, "test record", "tests")


def test_the_command_line_acts_as_the_user_its_token_proves(platform, line, promoted, team):
    from typer.testing import CliRunner

    from flows.cli import build_app

    app, runner = build_app(), CliRunner()
    refused = runner.invoke(app, ["model", "promote", line, "2", "--reason", "x"],
                            env={"ESD_TOKEN": team["sam"]["token"]})
    assert refused.exit_code == 1 and "needs role operator" in refused.output, refused.output
    bogus = runner.invoke(app, ["request", "withdraw", promoted["request_id"], "--reason", "x"],
                          env={"ESD_TOKEN": "esd_nobody"})
    assert bogus.exit_code == 1 and "not a valid credential" in bogus.output
    assert runner.invoke(app, ["user", "add", "mallory", "--role", "operator"],
                         env={"ESD_TOKEN": team["olga"]["token"]}).exit_code == 1


def test_a_reader_reads_the_registry_but_cannot_move_production(full_stack, line, team):
    from mlflow import MlflowClient

    from infra.env import environ

    with environ({"MLFLOW_TRACKING_USERNAME": team["rita"]["name"], "MLFLOW_TRACKING_PASSWORD": team["rita"]["token"]}):
        client = MlflowClient(full_stack.tracking_uri)
        assert client.get_model_version(line, "1").version == "1"
        with pytest.raises(Exception, match="403"):
            client.set_registered_model_alias(line, "production", "1")


def test_every_endpoint_refuses_without_the_right_role_and_names_a_bad_field(api, line, promoted, team):
    rid = promoted["request_id"]
    acts = [("post", f"/v1/requests/{rid}/promote", {"reason": "r"}), ("post", f"/v1/requests/{rid}/hold", {"reason": "r"}),
            ("post", f"/v1/requests/{rid}/withdraw", {"reason": "r"}), ("post", f"/v1/models/{line}/rollback", {"reason": "r"}),
            ("delete", "/v1/webhooks/wh-nothing", None), ("get", f"/v1/models/{line}", None), ("get", "/v1/requests", None)]
    allowed = {"reader": {f"/v1/models/{line}"}, "submitter": {"/v1/requests"}}
    for method, path, body in acts:
        call = lambda headers=None: api.request(method.upper(), path, json=body, headers=headers)
        assert call().status_code == 401, (method, path)
        assert call({"Authorization": "Bearer esd_forged"}).status_code == 401, (method, path)
        for who in ("reader", "submitter"):
            if path not in allowed[who]:
                refused = call(team[{"reader": "rita", "submitter": "sam"}[who]]["auth"])
                assert refused.status_code == 403 and "needs role" in refused.json()["detail"], (who, path)
    olga = team["olga"]["auth"]
    for path, body, field in [(f"/v1/requests/{rid}/promote", {}, "reason"),
                              (f"/v1/requests/{rid}/promote", {"reason": "r", "force": "maybe"}, "force"),
                              (f"/v1/requests/{rid}/hold", {"reason": "x" * 501}, "reason"),
                              (f"/v1/requests/{rid}/withdraw", {"reason": "r", "extra": 1}, "extra"),
                              (f"/v1/models/{line}/rollback", {"reason": "r", "to": 0}, "to"),
                              ("/v1/webhooks", {"url": "file:///etc/passwd", "request_id": rid}, "url")]:
        r = api.post(path, json=body, headers=olga)
        assert r.status_code == 422 and any(field in d["loc"] for d in r.json()["detail"]), (path, r.text)
    assert api.post("/v1/requests/api-nothing/hold", json={"reason": "r"}, headers=olga).status_code == 404
    assert api.post("/v1/models/no-such/rollback", json={"reason": "r"}, headers=olga).status_code == 404
    assert api.delete("/v1/webhooks/wh-nothing", headers=olga).status_code == 404
    assert api.get("/v1/requests", params={"limit": 0}, headers=olga).status_code == 422
