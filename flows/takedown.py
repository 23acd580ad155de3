"""The takedown flow: one request -> erase -> evaluate -> register -> gate -> promote or hold."""

from __future__ import annotations

import signal

from prefect import flow
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from esd import erase_defaults
from esd.erase import EraseConfig
from flows.deploy import lineage_slot
from flows.gate import load_settings
from flows.platform import Platform
from flows.report import publish_report
from flows.tasks import (apply_gate, erase_concepts, evaluate_candidate, hold, promote_version, register_candidate,
                         resolve_parent, start_request)


def _run_ended(flow, flow_run, state) -> None:
    """Crashed (killed, out of memory) or cancelled: the request is failed with the reason, never left running."""
    Platform().requests.fail([flow_run.parameters["request_id"]],
                             f"the takedown run was {state.name.lower()}: {state.message or 'no message'}")


def ended_by(exc: BaseException) -> BaseException:
    """What a failed takedown run ends with: EXC, or a TerminationSignal where Prefect holds the run as cancelling (or
    cancelled) and EXC is not one. Cancelled, the run gets the worker's SIGTERM, which Prefect raises as a
    TerminationSignal wherever the run is; a library running at that moment can turn it into an error of its own
    with the cause lost (safetensors reading a checkpoint, under diffusers' "Unable to load weights"), and the run
    is still reported, and ended, as cancelled."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.get_id()
    if isinstance(exc, TerminationSignal) or run_id is None:       # outside a flow run: the error as raised
        return exc
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
    except Exception:           # Prefect unreachable: the error as raised
        return exc
    if state is not None and (state.is_cancelling() or state.is_cancelled()):
        return TerminationSignal(signal=signal.SIGTERM)
    return exc


@flow(name="takedown", log_prints=True, on_crashed=[_run_ended], on_cancellation=[_run_ended])
def takedown(request_id: str, overrides: dict | None = None) -> dict:
    """Erase the request's concept from its model's current production version and promote it if the gate passes
    and production is still the version it was built on."""
    try:
        load_settings()                        # the gate's and the operator's erase settings are checked before
        operator = erase_defaults.load()       # any work, not after the erasure
        req = start_request(request_id, flow_run.get_id())
        settings = erase_defaults.settings(req["method"], req["kind"], overrides, operator)
        EraseConfig.with_overrides([req["concept"]], req["method"], settings)      # refused before any work
        with lineage_slot(req["model"]):
            parent = resolve_parent(req["model"])
            key = f"takedown-{request_id}"
            delta_dir = erase_concepts(key, req["model"], parent["version"], [req["concept"]], req["method"],
                                       [request_id], settings)
            report = evaluate_candidate(key, req["model"], delta_dir, [req["concept"]], parent["erased"], req["kind"])
            version = register_candidate(req["model"], delta_dir, [request_id], report, req["run_id"])
            verdict = apply_gate(report, req["kind"], req["model"], version, [request_id])
            status = "held"
            if verdict["passed"]:
                moved = promote_version(req["model"], version, f"takedown {request_id}: gate passed",
                                        parent["version"]).get("moved")
                if moved:
                    hold([request_id], moved)
                else:
                    status = "promoted"
            else:
                hold([request_id])
        publish_report(f"Takedown {req['concept']!r} ({req['kind']}, {req['method']})", [request_id], req["model"],
                       version, report, verdict, status, req["run_id"])
        return {"request_id": request_id, "model_version": version, "status": status, "verdict": verdict}
    except BaseException as exc:
        stop = ended_by(exc)
        Platform().requests.fail([request_id], stop)
        if stop is not exc:
            raise stop from exc
        raise
