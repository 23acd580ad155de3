"""The reaper: a request whose flow run ended without finishing it (a worker killed with SIGKILL, a lost machine,
a run deleted) becomes failed with the reason, never stays running. It runs on a schedule (deployment "reap",
every ESD_REAP_MINUTES) and on demand (`esd request reap`).

A run is dead when Prefect says it ended (Crashed included: the "crash silent runs" automation marks runs whose
heartbeats stopped, on any host) or when the process that took the request, on this host, is gone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prefect import flow

from flows.platform import Platform


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_process() -> str:
    """host:pid:start of the running process, as a request records its runner."""
    return f"{socket.gethostname()}:{os.getpid()}:{_started(os.getpid()) or ''}"


def runner_gone(runner: str | None) -> bool:
    """True when RUNNER ran on this host and that process no longer exists (other hosts: unknown, False)."""
    try:
        host, pid, start = (runner or "").rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname() or not start or not Path("/proc/self/stat").exists():
        return False
    return _started(pid) != start


def dead_runs(platform: Platform) -> list[tuple[str, str]]:
    """(request id, why) for every received or running request whose flow run is over or gone; a run whose process
    is gone is marked Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

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
                elif status == "running" and runner_gone(r.runner):
                    why = f"the process running it ({r.runner}) is gone"
                    dead.append((r.request_id, why))
                    # Prefect still shows the run as running: say what happened there too.
                    client.set_flow_run_state(r.flow_run_id, Crashed(message=why), force=True)
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
