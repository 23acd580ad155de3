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
    ui = s.prefect_api.removesuffix("/api")
    return s.prefect_env() | {"PREFECT_API_DATABASE_CONNECTION_URL": _database_url(s),
                              # Basic auth on every API route (health and readiness excepted), CSRF tokens for
                              # every state-changing request, and cross-origin calls from the UI's own origin only.
                              "PREFECT_SERVER_API_AUTH_STRING": s.prefect_auth() or "",
                              "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
                              "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ui,
                              "PREFECT_SERVER_CORS_ALLOWED_METHODS": "GET,POST,PATCH,PUT,DELETE,OPTIONS",
                              "PREFECT_SERVER_CORS_ALLOWED_HEADERS": "Authorization,Content-Type,Prefect-Csrf-Token,"
                                                                     "Prefect-Csrf-Client",
                              "PREFECT_SERVER_API_HOST": s.host, "PREFECT_SERVER_API_PORT": str(s.prefect_port),
                              # Start-up on two cores can exceed the 20 s defaults.
                              "PREFECT_API_DATABASE_TIMEOUT": "60", "PREFECT_API_REQUEST_TIMEOUT": "120",
                              # Concurrency leases on disk beside the database, not in memory: a restarted server
                              # still knows who holds a slot, and frees it when its holder stops renewing.
                              "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE":
                                  "prefect.server.concurrency.lease_storage.filesystem"}


def worker_command(s: Settings) -> list[str]:
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", s.work_pool, "--type", "process",
            "--name", worker_name(), "--limit", str(s.worker_limit)]


def worker_name() -> str:
    return f"esd-{socket.gethostname()}"


def api(s: Settings, method: str, path: str, body: dict | None = None, timeout: float = 5):
    """One request to the Prefect API with the stack's credentials (and a CSRF token for a state-changing one)."""
    import uuid

    import httpx

    headers = {}
    if auth := s.prefect_auth():
        headers["Authorization"] = httpx.BasicAuth(*auth.split(":", 1))._auth_header
    with httpx.Client(base_url=s.prefect_api, headers=headers, timeout=timeout) as client:
        if method != "GET":
            cid = str(uuid.uuid4())
            token = client.get("/csrf-token", params={"client": cid})
            if token.status_code == 200:
                client.headers.update({"Prefect-Csrf-Token": token.json()["token"], "Prefect-Csrf-Client": cid})
        return client.request(method, path, json=body)


def worker_online(s: Settings) -> bool:
    """Whether the Prefect server sees this machine's worker polling its pool (the worker opens no port)."""
    try:
        r = api(s, "POST", f"/work_pools/{s.work_pool}/workers/filter", {})
    except OSError:
        return False
    except Exception as exc:    # httpx's transport errors
        if type(exc).__module__.startswith("httpx"):
            return False
        raise
    return r.status_code == 200 and any(w["name"] == worker_name() and w["status"] == "ONLINE" for w in r.json())


def worker_env(s: Settings) -> dict[str, str]:
    return s.to_env() | s.s3_env() | s.client_env() | {
                              # Poll for scheduled runs every 2 s (default 10 s): a takedown starts at once.
                              "PREFECT_WORKER_QUERY_SECONDS": "2",
                              "PREFECT_API_REQUEST_TIMEOUT": "120",
                              # Heartbeats of flow runs, read by the "crash silent flow runs" automation.
                              "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
