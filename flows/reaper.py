"""The reaper: a request whose flow run ended without finishing it (a worker killed with SIGKILL, a lost machine,
a run deleted) becomes failed with the reason, never stays running. It runs on a schedule (deployment "reap",
every ESD_REAP_MINUTES) and on demand (`esd request reap`)."""

from __future__ import annotations

from prefect import flow

from flows.platform import Platform


def dead_runs(platform: Platform) -> list[tuple[str, str]]:
    """(request id, why) for every received or running request whose flow run is over or gone."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    dead = []
    with get_client(sync_client=True) as client:
        for status in ("received", "running"):
            for r in platform.requests.list(status, max_results=None):
                if not r.flow_run_id:
                    continue
                try:
                    state = client.read_flow_run(r.flow_run_id).state
                except ObjectNotFound:
                    dead.append((r.request_id, f"its flow run {r.flow_run_id} no longer exists"))
                    continue
                if state is not None and state.is_final():
                    dead.append((r.request_id, f"its flow run ended {state.name} without finishing the request"))
    return dead


def reap_dead(platform: Platform) -> list[tuple[str, str]]:
    """Fail the requests whose flow run is dead; returns (request id, why) for each."""
    dead = dead_runs(platform)
    for request_id, why in dead:
        platform.requests.fail([request_id], why)
    return dead


@flow(name="reap", log_prints=True)
def reap() -> list[str]:
    """Fail the requests whose flow run is dead; returns their ids."""
    dead = reap_dead(Platform())
    for request_id, why in dead:
        print(f"request {request_id}: failed ({why})")
    return [request_id for request_id, _ in dead]
