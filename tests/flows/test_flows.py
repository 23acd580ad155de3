"""End to end: a real Prefect server and process worker, MLflow server and SeaweedFS, started by fixtures;
the committed toy base registered as toy-sd; takedowns run by the worker exactly as in production."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import local_stack

CONCEPT = "Vela Moreau"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    import flows.cli  # registers the deployments hook  # noqa: F401
    from flows import ops
    from infra.settings import Settings

    saved = dict(os.environ)
    os.environ["ESD_EVAL_ATTACK"] = "false"
    with local_stack(tmp_path_factory.mktemp("platform")) as settings:
        # The CLI and the flows read Settings() from the environment: point it at this stack.
        os.environ.update(settings.to_env() | settings.prefect_env())
        ops.settings.cache_clear()
        yield Settings()
    os.environ.clear()
    os.environ.update(saved)
    ops.settings.cache_clear()


def esd(*args):
    from flows.cli import app
    return CliRunner().invoke(app, list(args))


def test_takedown_registers_promotes_and_records(platform):
    from prefect.client.orchestration import get_client
    from registry.versions import list_versions

    base = esd("base", "build-toy")
    assert base.exit_code == 0, base.output
    r = esd("request", "submit", CONCEPT, "--kind", "style", "--requester", "TICKET-1", "--request-id",
            "req-vela-1", "--wait", "--json")
    assert r.exit_code == 0, r.output
    req = json.loads(r.output.strip().splitlines()[-1])
    assert req["status"] == "promoted" and req["gate"] == "passed", req
    assert req["model_version"] == "2" and req["flow_run_id"]
    shown = json.loads(esd("request", "show", "req-vela-1", "--json").output)
    assert {k: shown[k] for k in ("status", "model_version", "flow_run_id")} == \
        {k: req[k] for k in ("status", "model_version", "flow_run_id")}
    store = platform.store()
    versions = list_versions(store, "toy-sd")
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[1]["request_ids"] == ["req-vela-1"] and "production" in versions[1]["aliases"]
    # the request's MLflow run carries the metrics and the before/after grid
    run = store.mlflow().get_run(req["run_id"])
    # promoted under the default style gate: at most 10% of her images still in her style
    assert run.data.metrics["rate.Vela_Moreau"] <= 0.1 and "h_score" in run.data.metrics
    assert any(a.path.startswith("grids") for a in store.mlflow().list_artifacts(req["run_id"], "grids"))
    from flows.deploy import prefect_api
    with prefect_api(platform.prefect_api), get_client(sync_client=True) as client:
        fr = client.read_flow_run(req["flow_run_id"])
        assert "request:req-vela-1" in fr.tags and fr.state.is_completed()
    from prefect.artifacts import Artifact
    with prefect_api(platform.prefect_api):
        report = Artifact.get("takedown-req-vela-1")
    assert report is not None and "gate: **passed**" in report.data and "before-after" in report.data


def test_duplicate_submit_gives_one_run_and_one_version(platform):
    from registry.versions import list_versions

    first = json.loads(esd("request", "show", "req-vela-1", "--json").output)
    again = esd("request", "submit", CONCEPT, "--kind", "style", "--request-id", "req-vela-1", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["flow_run_id"] == first["flow_run_id"]
    assert [v["version"] for v in list_versions(platform.store(), "toy-sd")] == [1, 2]


@pytest.mark.parametrize("args, message", [
    (["request", "submit", "", "--kind", "style"], "concept is empty"),
    (["request", "submit", "x" * 201, "--kind", "style"], "limit is 200"),
    (["request", "submit", "circle\x1b[31m", "--kind", "object"], "control characters"),
    (["request", "submit", "circle", "--kind", "weather"], "unknown kind 'weather'"),
    (["request", "submit", "circle", "--kind", "object", "--method", "esd-q"], "unknown method 'esd-q'"),
    (["request", "submit", "circle", "--kind", "object", "--model", "no-such-sd"], "unknown base model 'no-such-sd'"),
    (["request", "submit", "circle", "--kind", "object", "--requester", "jane@example.com"], "not an e-mail"),
])
def test_bad_requests_are_refused_and_nothing_is_filed(platform, args, message):
    from flows import ops

    before = len(ops.requests().list())
    r = esd(*args)
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1
    assert len(ops.requests().list()) == before


def test_rollback_restores_previous_production_and_generate_serves_it(platform, tmp_path):
    from PIL import Image
    from esd.models import load_pipeline
    from esd.toy import BASE_DIR
    from registry.load import generate

    r = esd("model", "rollback", "toy-sd", "--reason", "test rollback")
    assert r.exit_code == 0, r.output
    out = tmp_path / "g.png"
    g = esd("generate", "a red circle in the style of Vela Moreau", "--model", "toy-sd@production", "-o", str(out),
            "--seed", "3")
    assert g.exit_code == 0, g.output
    served = torch.tensor(list(Image.open(out).getdata()))
    expected = generate(load_pipeline(BASE_DIR), ["a red circle in the style of Vela Moreau"], seed=3,
                        num_inference_steps=25, guidance_scale=5.0)[0]
    img = Image.fromarray(expected).resize((expected.shape[1] * 4, expected.shape[0] * 4), Image.NEAREST)
    assert torch.equal(served, torch.tensor(list(img.getdata())))
    history = json.loads(esd("model", "history", "toy-sd", "--json").output)
    assert history[-1]["action"] == "rollback" and history[-1]["to"] == 1 and history[-1]["from"] == 2
    # no earlier production to roll back to: one clear line, nothing moved
    again = esd("model", "rollback", "toy-sd", "--reason", "again")
    assert again.exit_code == 1 and "no earlier production" in again.output


def test_withdrawn_request_is_excluded_from_retrain(platform):
    from flows import ops
    from flows.cli import follow, submit
    from registry.versions import list_versions

    circle = submit("circle", "object", "toy-sd", request_id="req-circle-1")
    follow(circle["flow_run_id"])
    w = esd("request", "withdraw", "req-circle-1", "--reason", "requester withdrew")
    assert w.exit_code == 0, w.output
    assert ops.requests().require("req-circle-1").status == "withdrawn"
    r = esd("retrain", "--now", "--wait")
    assert r.exit_code == 0, r.output
    # Production now carries the consolidated erasure of the active requests only. (Here that is Vela Moreau
    # alone from the base, bit-identical to its takedown's delta, so the registry reuses that version.)
    production = [v for v in list_versions(platform.store(), "toy-sd") if "production" in v["aliases"]]
    assert len(production) == 1
    assert production[0]["request_ids"] == ["req-vela-1"] and production[0]["erased"] == [CONCEPT]


def test_retrain_deployment_has_its_schedule(platform):
    from prefect.client.orchestration import get_client

    from flows.deploy import prefect_api
    with prefect_api(platform.prefect_api), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/retrain")
    crons = [s.schedule.cron for s in dep.schedules]
    assert crons == [platform.retrain_cron]


def test_promote_from_the_command_line_promotes_held_requests(platform):
    from flows import ops
    from registry.versions import list_versions

    version = next(v["version"] for v in list_versions(platform.store(), "toy-sd") if "production" in v["aliases"])
    assert esd("model", "rollback", "toy-sd", "--reason", "review").exit_code == 0
    # as if its gate had held it: an operator reviews the version and promotes it by hand
    ops.requests().update("req-vela-1", "held")
    r = esd("model", "promote", "toy-sd", str(version), "--reason", "reviewed by trust and safety", "--actor", "ops")
    assert r.exit_code == 0, r.output
    req = ops.requests().require("req-vela-1")
    assert req.status == "promoted" and str(req.model_version) == str(version)
    assert json.loads(esd("model", "history", "toy-sd", "--json").output)[-1]["to"] == version
