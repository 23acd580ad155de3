"""The Prefect server and a process worker as stack services (see infra.stack.SERVICES)."""

from __future__ import annotations

import socket
import sys

from infra.settings import Settings

# Flow runs send a heartbeat every HEARTBEAT_S (Prefect's minimum); see flows.deploy.ensure_zombie_automation.
HEARTBEAT_S = 30


def _database_url(s: Settings) -> str:
    return s.prefect_database_url or f"sqlite+aiosqlite:///{(s.home / 'prefect' / 'prefect.db').resolve()}"


def server_command(s: Settings) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", s.host, "--port", str(s.prefect_port)]


def server_env(s: Settings) -> dict[str, str]:
    (s.home / "prefect").mkdir(parents=True, exist_ok=True)
    return s.prefect_env() | {"PREFECT_API_DATABASE_CONNECTION_URL": _database_url(s),
                              "PREFECT_SERVER_API_HOST": s.host, "PREFECT_SERVER_API_PORT": str(s.prefect_port),
                              # Start-up on two cores can exceed the 20 s defaults.
                              "PREFECT_API_DATABASE_TIMEOUT": "60", "PREFECT_API_REQUEST_TIMEOUT": "120",
                              # Concurrency leases on disk beside the database, not in memory: a restarted server
                              # still knows who holds a slot, and frees it when its holder stops renewing.
                              "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE":
                                  "prefect.server.concurrency.lease_storage.filesystem"}


def worker_command(s: Settings) -> list[str]:
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", s.work_pool, "--type", "process",
            "--name", f"esd-{socket.gethostname()}", "--limit", str(s.worker_limit), "--with-healthcheck"]


def worker_env(s: Settings) -> dict[str, str]:
    return s.to_env() | s.s3_env() | s.prefect_env() | {"PREFECT_WORKER_WEBSERVER_HOST": s.host,
                              "PREFECT_WORKER_WEBSERVER_PORT": str(s.worker_health_port),
                              # Poll for scheduled runs every 2 s (default 10 s): a takedown starts at once.
                              "PREFECT_WORKER_QUERY_SECONDS": "2",
                              "PREFECT_API_REQUEST_TIMEOUT": "120",
                              # Heartbeats of flow runs, read by the "crash silent flow runs" automation.
                              "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
