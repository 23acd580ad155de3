"""Faults under running takedowns and retrains, on the whole platform (Prefect server and process worker, MLflow,
SeaweedFS): a worker killed, a run cancelled, two workers racing on one model, an operator's rollback and a
withdrawal mid-run, every server restarted mid-flow, a retrain over more than 200 records.

Each disruptive fault gets its own base line, so a slot still leased by a killed run delays no other test."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

from typer.testing import CliRunner

from flows.cli import build_app
from flows.requests import Request
from infra import stack as stack_lib
from tests.conftest import FAST_METHOD
from tests.faults.conftest import audit

APP = build_app()
# A slow erasure, so that a fault lands inside it.
SLOW = {"iterations": 3000}


def new_line(platform) -> str:
    from esd.toy import BASE_DIR
    from flows.cli import ensure_base

    name = f"toy-fault-{uuid.uuid4().hex[:6]}"        # toy-*: the toy judge evaluates it
    ensure_base(platform, name, BASE_DIR)
    return name


def submit(platform, model: str, concept: str = "Vela Moreau", kind: str = "style", method: str | None = None,
           overrides: dict | None = None) -> tuple[str, str]:
    """File a request and start its takedown deployment; (request id, flow run id)."""
    from prefect.deployments import run_deployment

    from flows.deploy import prefect_api

    req = Request(concept, kind, model, method=method, request_id=f"req-{uuid.uuid4().hex[:10]}").validate()
    platform.requests.file(req)
    with prefect_api(platform.settings.prefect_api):
        run = run_deployment("takedown/takedown", parameters={"request_id": req.request_id,
                                                              "overrides": overrides or {}},
                             idempotency_key=req.request_id, timeout=0, as_subflow=False)
    platform.requests.update(req.request_id, flow_run_id=str(run.id))
    return req.request_id, str(run.id)


def wait_for(what, timeout: float = 240, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {getattr(what, '__name__', 'a condition')}")


def flow_state(platform, flow_run_id: str):
    from prefect.client.orchestration import get_client

    from flows.deploy import prefect_api

    with prefect_api(platform.settings.prefect_api), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def erasing(platform, flow_run_id: str) -> bool:
    """The run's erasure task is running."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    from flows.deploy import prefect_api

    with prefect_api(platform.settings.prefect_api), get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    return any(t.name.startswith("erase_concepts") and t.state and t.state.is_running() for t in runs)


def settled(platform, request_id: str) -> str | None:
    """The request's status once no run is working on it (the reaper run as its schedule would)."""
    from flows.reaper import reap_dead
    from flows.deploy import prefect_api

    with prefect_api(platform.settings.prefect_api):
        reap_dead(platform)
    r = platform.requests.require(request_id)
    return r.status if r.status not in ("received", "running") else None


def finished(platform, request_id: str, flow_run_id: str) -> str | None:
    state = flow_state(platform, flow_run_id)
    return platform.requests.require(request_id).status if state and state.is_final() else None


def clean(row: dict) -> None:
    assert (row["lost"], row["half_made"], row["wrong_aliases"]) == (0, 0, 0), row


def test_worker_sigkilled_mid_erasure(platform, full_stack, ledger):
    model = new_line(platform)
    rid, frid = submit(platform, model, "circle", "object", method="esd-x", overrides=SLOW)
    wait_for(lambda: erasing(platform, frid))
    runner = platform.requests.require(rid).runner
    os.killpg(stack_lib.running_pid(full_stack, "prefect-worker"), signal.SIGKILL)
    try:
        status = wait_for(lambda: settled(platform, rid), timeout=60)
    finally:
        stack_lib.up(full_stack, ("prefect-worker",))
    got = platform.requests.require(rid)
    # the run's own process saw its worker die and failed the request, or the reaper found the process gone
    assert status == "failed" and ("stopped" in got.reason or f"({runner}) is gone" in got.reason), got
    # the run's process (or the zombie automation, after 90 s without heartbeats) ends its flow run too
    assert wait_for(lambda: flow_state(platform, frid).is_final(), timeout=180)
    clean(ledger.record("worker SIGKILLed mid-erasure", audit(platform, model, [rid])))


def test_flow_run_cancelled_mid_erasure(platform, ledger):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from flows.deploy import prefect_api

    model = new_line(platform)
    rid, frid = submit(platform, model, "circle", "object", method="esd-x", overrides=SLOW)
    wait_for(lambda: erasing(platform, frid))
    with prefect_api(platform.settings.prefect_api), get_client(sync_client=True) as client:
        client.set_flow_run_state(frid, Cancelling(), force=True)
    wait_for(lambda: flow_state(platform, frid).is_final(), timeout=120)
    assert flow_state(platform, frid).is_cancelled(), flow_state(platform, frid)
    assert wait_for(lambda: settled(platform, rid), timeout=30) == "failed"
    assert "cancelled" in platform.requests.require(rid).reason
    clean(ledger.record("flow run cancelled mid-erasure", audit(platform, model, [rid])))


def test_two_takedowns_on_one_model_with_two_workers(platform, full_stack, ledger):

    from infra import prefect_server

    model = new_line(platform)
    command = prefect_server.worker_command(full_stack)
    command[command.index("--name") + 1] = "esd-second-worker"
    env = os.environ | prefect_server.worker_env(full_stack)
    second = subprocess.Popen(command, env=env, cwd=full_stack.home, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runs = [submit(platform, model, "Vela Moreau", "style", method=FAST_METHOD),
                submit(platform, model, "circle", "object", method=FAST_METHOD)]
        statuses = [wait_for(lambda r=r: finished(platform, *r), timeout=300) for r in runs]
    finally:
        stack_lib.stop_group(second.pid, again_after=stack_lib.PREFECT_WORKER.stop_again_s)      # as `stack down`
        second.wait(5)
    assert statuses == ["promoted", "promoted"], [platform.requests.require(r).reason for r, _ in runs]
    from registry.aliases import current
    from registry.versions import show

    assert sorted(show(platform.store, model, current(platform.store, model))["erased"]) == ["Vela Moreau", "circle"]
    clean(ledger.record("two takedowns on one model at once, two workers",
                        audit(platform, model, [r for r, _ in runs])))


def test_rollback_during_a_takedown(platform, ledger):
    model = new_line(platform)
    rid, frid = submit(platform, model, "circle", "object", method="esd-x", overrides={"iterations": 20})
    wait_for(lambda: erasing(platform, frid))
    r = CliRunner().invoke(APP, ["model", "rollback", model, "--reason", "operator rollback mid-run"])
    assert r.exit_code == 0, r.output          # it waited for the takedown's slot, then rolled its version back
    assert finished(platform, rid, frid) is not None
    got = platform.requests.require(rid)
    assert got.status == "held" and "does not erase 'circle'" in got.reason, got
    clean(ledger.record("rollback during a takedown", audit(platform, model, [rid])))


def test_withdrawal_during_a_takedown(platform, ledger):
    model = new_line(platform)
    rid, frid = submit(platform, model, "circle", "object", method="esd-x", overrides={"iterations": 20})
    wait_for(lambda: erasing(platform, frid))
    r = CliRunner().invoke(APP, ["request", "withdraw", rid, "--reason", "the artist withdrew"])
    assert r.exit_code == 0, r.output
    wait_for(lambda: finished(platform, rid, frid), timeout=180)
    assert platform.requests.require(rid).status == "withdrawn"
    clean(ledger.record("withdrawal during a takedown", audit(platform, model, [rid])))


def test_every_server_restarted_mid_flow(platform, full_stack, ledger):
    from flows import deploy

    model = new_line(platform)
    rid, frid = submit(platform, model, "circle", "object", method="esd-x", overrides={"iterations": 100})
    wait_for(lambda: erasing(platform, frid))
    time.sleep(5)                                    # inside the erasure's loop, its slots held
    stack_lib.down(full_stack, ("seaweedfs", "mlflow", "prefect-server"))      # SIGTERM each, wait for its exit
    deploy.up(full_stack)                                                       # `esd stack up`
    assert wait_for(lambda: finished(platform, rid, frid), timeout=300) == "promoted"
    clean(ledger.record("every server restarted mid-flow", audit(platform, model, [rid])))


def test_a_retrain_over_more_than_200_records(platform, ledger):
    """205 active records of two concepts, plus withdrawn and failed ones of a third: the retrain (started from the
    command line) erases every active concept and only those, and promotes."""
    from registry.aliases import current
    from registry.versions import show

    model = new_line(platform)
    client, exp = platform.requests.client, platform.requests.experiment_id

    def record(concept: str, kind: str, status: str) -> str:
        req = Request(concept, kind, model, method=FAST_METHOD, request_id=str(uuid.uuid4())).validate()
        req.status = status
        client.create_run(exp, run_name=f"{kind}: {concept}", tags=req.tags())
        return req.request_id

    # records as the platform writes them, made directly: filing 205 one by one takes minutes
    ids = [record(*(("Vela Moreau", "style") if i % 2 else ("circle", "object")), ("promoted", "held", "candidate")[i % 3])
           for i in range(205)]
    dropped = [record("square", "object", status) for status in ("withdrawn", "failed")]
    r = CliRunner().invoke(APP, ["retrain", "--now", "--wait", "--model", model])
    assert r.exit_code == 0 and "finished: Completed" in r.output, r.output
    info = show(platform.store, model, current(platform.store, model))
    assert sorted(info["erased"]) == ["Vela Moreau", "circle"] and sorted(info["request_ids"]) == sorted(ids)
    assert {r.status for r in platform.requests.list(model=model, max_results=None)
            if r.request_id not in dropped} == {"promoted"}
    assert [platform.requests.require(d).status for d in dropped] == ["withdrawn", "failed"]
    clean(ledger.record("retrain over 205 request records", audit(platform, model, ids)))
