"""End to end: a real Prefect server and process worker, MLflow server and SeaweedFS, started once per test run
(tests/conftest.py); the committed toy base registered as toy-sd; takedowns run by the worker exactly as in
production.

Orchestration is under test here, not erasure quality: the worker evaluates with a small budget (2 DDIM steps)
and a permissive gate. The engine tests and `esd bench quality` measure quality; tests/flows/test_gate.py the gate.
Every test can run alone: what it needs comes from fixtures, and what it moves it puts back.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import build_app
from tests.conftest import FAST_METHOD

CONCEPT = "Vela Moreau"
APP = build_app()


def esd(*args: str, env: dict | None = None):
    return CliRunner().invoke(APP, list(args), env=env)


def last_json(result) -> dict:
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def vela(platform) -> dict:
    """One takedown of Vela Moreau run by the worker: the request record once its run ended."""
    r = esd("request", "submit", CONCEPT, "--kind", "style", "--method", FAST_METHOD, "--requester",
            "TICKET-1", "--request-id", "req-vela-1", "--wait", "--json")
    assert r.exit_code == 0, r.output
    return last_json(r)


def production(platform) -> int:
    from registry.versions import resolve

    return int(resolve(platform.store, "toy-sd@production").version)


def test_takedown_registers_promotes_and_records(platform, vela):
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client

    from flows.deploy import prefect_api
    from registry.versions import lineage, show

    assert vela["status"] == "promoted" and vela["gate"] == "passed", vela
    assert vela["flow_run_id"] and vela["model_version"]
    shown = last_json(esd("request", "show", "req-vela-1", "--json"))
    assert {k: shown[k] for k in ("status", "model_version", "flow_run_id")} == \
        {k: vela[k] for k in ("status", "model_version", "flow_run_id")}
    version = int(vela["model_version"])
    info = show(platform.store, "toy-sd", version)
    assert info["request_ids"] == ["req-vela-1"] and info["erased"] == [CONCEPT] and info["gate"] == "passed"
    assert [r["version"] for r in lineage(platform.store, "toy-sd", version)][-1] == 1
    # the request's MLflow run carries the metrics and the before/after grid
    client = platform.store.mlflow()
    metrics = client.get_run(vela["run_id"]).data.metrics
    assert 0.0 <= metrics["rate.Vela_Moreau"] <= 1.0 and "h_score" in metrics and "preservation" in metrics
    assert any(a.path.startswith("grids") for a in client.list_artifacts(vela["run_id"], "grids"))
    with prefect_api(platform.settings.prefect_api), get_client(sync_client=True) as prefect:
        fr = prefect.read_flow_run(vela["flow_run_id"])
        assert "request:req-vela-1" in fr.tags and fr.state.is_completed()
    with prefect_api(platform.settings.prefect_api):
        report = Artifact.get("takedown-req-vela-1")
    assert report is not None and "gate: **passed**" in report.data and "before-after" in report.data
    # the automatic promotion went through the one promotion path: recorded in the history
    events = json.loads(esd("model", "history", "toy-sd", "--json").output)
    assert any(e["to"] == version and e["alias"] == "production" and "req-vela-1" in e["reason"] for e in events)


def test_duplicate_submit_gives_one_run_and_one_version(platform, vela):
    from registry.versions import list_versions

    before = [v["version"] for v in list_versions(platform.store, "toy-sd")]
    again = esd("request", "submit", CONCEPT, "--kind", "style", "--method", FAST_METHOD, "--request-id",
                "req-vela-1", "--json")
    assert again.exit_code == 0, again.output
    assert last_json(again)["flow_run_id"] == vela["flow_run_id"]
    assert [v["version"] for v in list_versions(platform.store, "toy-sd")] == before


@pytest.mark.parametrize("args, message", [
    (["request", "submit", "", "--kind", "style"], "concept is empty"),
    (["request", "submit", "x" * 201, "--kind", "style"], "limit is 200"),
    (["request", "submit", "circle\x1b[31m", "--kind", "object"], "control characters"),
    (["request", "submit", "circle", "--kind", "object", "--method", "esd-q"], "unknown method 'esd-q'"),
    (["request", "submit", "circle", "--kind", "object", "--model", "no-such-sd"], "unknown base model 'no-such-sd'"),
    (["request", "submit", "circle", "--kind", "object", "--requester", "jane@example.com"], "not an e-mail"),
    (["request", "withdraw", "no-such-request", "--reason", "x"], "no request with id 'no-such-request'"),
    (["request", "submit", "circle", "--kind", "object", "--model", "toy' or name='x"], "model name"),
    (["request", "retry", "no-such-request"], "no request with id 'no-such-request'"),
    (["model", "promote", "toy-sd", "1", "--reason", " "], "a reason is required"),
])
def test_bad_requests_are_refused_and_nothing_is_filed(platform, args, message):
    before = len(platform.requests.list())
    r = esd(*args)
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert len(platform.requests.list()) == before


def test_rollback_restores_previous_production_and_generate_serves_it(platform, vela, tmp_path):
    from PIL import Image

    from esd import sample
    from registry.aliases import previous_production
    from registry.load import load

    version = int(vela["model_version"])
    assert esd("model", "promote", "toy-sd", str(version), "--reason", "test set-up").exit_code == 0
    expected_version = previous_production(platform.store, "toy-sd")
    r = esd("model", "rollback", "toy-sd", "--reason", "test rollback", "--json")
    assert r.exit_code == 0, r.output
    event = json.loads(r.output)
    assert (event["from"], event["to"], event["action"]) == (version, expected_version, "rollback")
    try:
        out = tmp_path / "g.png"
        prompt = "a red circle in the style of Vela Moreau"
        g = esd("generate", prompt, "--model", "toy-sd@production", "-o", str(out), "--seed", "3")
        assert g.exit_code == 0, g.output
        served = torch.from_numpy(np.asarray(Image.open(out).convert("RGB")).copy())
        pipe = load(platform.store, f"toy-sd/{expected_version}")
        img = sample.to_uint8(sample.generate(pipe, [prompt], [3], steps=25, guidance=5.0))[0]
        img = Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST)
        assert torch.equal(served, torch.from_numpy(np.asarray(img.convert("RGB")).copy()))
        history = json.loads(esd("model", "history", "toy-sd", "--json").output)
        assert (history[-1]["action"], history[-1]["from"], history[-1]["to"]) == ("rollback", version,
                                                                                     expected_version)
    finally:
        assert esd("model", "promote", "toy-sd", str(version), "--reason", "test tear-down").exit_code == 0


def test_retrain_deployment_has_its_schedule(platform):
    from prefect.client.orchestration import get_client

    from flows.deploy import prefect_api
    with prefect_api(platform.settings.prefect_api), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/retrain")
    assert [s.schedule.cron for s in dep.schedules] == [platform.settings.retrain_cron]


def test_promote_from_the_command_line_promotes_held_requests(platform, vela):
    version = int(vela["model_version"])
    assert esd("model", "promote", "toy-sd", str(version), "--reason", "test set-up").exit_code == 0
    assert esd("model", "rollback", "toy-sd", "--reason", "review").exit_code == 0
    # as if its gate had held it: an operator reviews the version and promotes it by hand
    platform.requests.update("req-vela-1", "held")
    from infra import users

    ops, token = users.add(platform.settings, f"ops-{uuid.uuid4().hex[:4]}", "operator")
    r = esd("model", "promote", "toy-sd", str(version), "--reason", "reviewed by trust and safety",
            env={"ESD_TOKEN": token})
    assert r.exit_code == 0, r.output
    req = platform.requests.require("req-vela-1")
    assert req.status == "promoted" and str(req.model_version) == str(version)
    last = json.loads(esd("model", "history", "toy-sd", "--json").output)[-1]
    assert (last["to"], last["actor"]) == (version, ops.name)


def test_an_operator_flow_records_itself_not_a_name_passed_in(platform):
    import inspect

    from flows.deploy import prefect_api
    from flows.operator import promote, rollback, withdraw
    from flows.requests import Request

    assert not any("actor" in inspect.signature(f.fn).parameters for f in (promote, rollback, withdraw))
    req, _ = platform.requests.file(Request(concept="square", kind="object", model="toy-sd",
                                            request_id="req-flow-withdrawn").validate())
    with prefect_api(platform.settings.prefect_api):
        withdraw(req.request_id, "duplicate of an earlier request")
    req = platform.requests.require("req-flow-withdrawn")
    assert req.status == "withdrawn"
    last = platform.requests.history(req.request_id)[-1]
    assert last["reason"] == "flow:withdraw: duplicate of an earlier request", last


def test_a_run_being_cancelled_ends_as_cancelled_whatever_a_library_raised(platform):
    """A library that turns the cancellation's TerminationSignal into an error of its own, the cause lost
    (safetensors under diffusers' "Unable to load weights"): while Prefect holds the run as cancelling, the takedown
    ends on a TerminationSignal (its request reads as terminated); otherwise on the error itself."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.exceptions import TerminationSignal
    from prefect.runtime import flow_run
    from prefect.states import Cancelling, Running

    from flows.deploy import prefect_api
    from flows.takedown import ended_by

    wrapped = OSError("Unable to load weights from checkpoint file for 'unet/x.safetensors'")

    @flow(name="cancelling-probe")
    def probe(cancel: bool) -> str:
        with get_client(sync_client=True) as client:
            if cancel:
                client.set_flow_run_state(flow_run.get_id(), Cancelling(), force=True)
            ended = ended_by(wrapped)
            client.set_flow_run_state(flow_run.get_id(), Running(), force=True)
        return type(ended).__name__

    with prefect_api(platform.settings.prefect_api):
        assert probe(False) == "OSError"
        assert probe(True) == "TerminationSignal"
    signal = TerminationSignal(signal=15)
    assert ended_by(signal) is signal and ended_by(wrapped) is wrapped          # outside a flow run: as raised


def test_the_reaper_fails_requests_whose_run_is_dead(platform, vela):
    from flows.requests import Request

    # as if the worker had been killed: the record still says running, its flow run is over (or gone)
    stuck, _ = platform.requests.file(Request(concept="circle", kind="object", model="toy-sd",
                                              request_id="req-stuck-1").validate())
    platform.requests.start(stuck.request_id, vela["flow_run_id"])
    gone, _ = platform.requests.file(Request(concept="square", kind="object", model="toy-sd",
                                             request_id="req-gone-1").validate())
    platform.requests.start(gone.request_id, "00000000-0000-0000-0000-000000000000")
    r = esd("request", "reap", "--json")
    assert r.exit_code == 0, r.output
    assert {"req-stuck-1", "req-gone-1"} <= set(json.loads(r.output))
    stuck, gone = platform.requests.require("req-stuck-1"), platform.requests.require("req-gone-1")
    assert (stuck.status, gone.status) == ("failed", "failed")
    assert "ended Completed without finishing" in stuck.reason and "no longer exists" in gone.reason
    assert platform.requests.require("req-vela-1").status == "promoted"        # a finished request is left alone
    assert "req-stuck-1" not in json.loads(esd("request", "reap", "--json").output)


def test_one_writer_per_model_lineage(platform, vela):
    from prefect.client.orchestration import get_client

    from flows.deploy import lineage_slot, prefect_api

    with prefect_api(platform.settings.prefect_api):
        with get_client(sync_client=True) as client:     # the takedown took toy-sd's slot: one at a time
            assert client.read_global_concurrency_limit_by_name("model-toy-sd").limit == 1
        with lineage_slot("toy-sd"):
            with pytest.raises(TimeoutError):
                with lineage_slot("toy-sd", timeout_seconds=3):
                    pass
            with lineage_slot("other-sd", timeout_seconds=3):      # another model's lineage is free
                pass
        with lineage_slot("toy-sd", timeout_seconds=3):          # released
            pass
