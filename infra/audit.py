"""`esd stack audit`: what an outsider on this machine could reach, read as a reviewer would.

For every listening socket that a process of the stack opened (found in /proc, not taken from settings), one
anonymous request of the kind that port speaks: an HTTP data request without credentials (asked again over TLS
without a client certificate where the port answers that it speaks only HTTPS), or, for a gRPC port, a plaintext
HTTP/2 preface and then a TLS handshake without a client certificate. A socket refuses when it
answers 401/403, demands TLS and refuses a client without a certificate, or closes on us. Then the modes of the
files under ESD_HOME, and a scan for the stack's secrets where they must never be: logs, process command lines,
MLflow params and tags, Prefect flow run parameters.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from infra import stack
from infra.settings import GENERATED, Settings

# An anonymous data request per known port: (method, path)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class SocketFinding:
    server: str
    port: int
    anonymous_refused: bool
    how: str


def _pids(s: Settings) -> dict[int, str]:
    """Every process of the services this stack started (their process groups), by PID -> service name."""
    groups = {pid: svc.name for svc in stack.SERVICES if svc.local(s) and (pid := stack.running_pid(s, svc.name))}
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                pgid = os.getpgid(int(d.name))
            except (ProcessLookupError, PermissionError):
                continue
            if pgid in groups:
                out[int(d.name)] = groups[pgid]
    return out


def listening(s: Settings) -> list[tuple[str, int]]:
    """(service, port) of every TCP socket in LISTEN state that a process of the stack holds."""
    inodes: dict[str, int] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":     # LISTEN
                inodes[f[9]] = int(f[1].rsplit(":", 1)[1], 16)
    found = set()
    for pid, name in _pids(s).items():
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and (inode := target[8:-1]) in inodes:
                found.add((name, inodes[inode]))
    return sorted(found, key=lambda x: (x[0], x[1]))


def _kind(s: Settings, service: str, port: int) -> str:
    """What a port is: a named HTTP API (stack.PROBES), "grpc" (SeaweedFS's gRPC ports are their HTTP port + 10000)."""
    if service == "seaweedfs":
        http = {s.s3_port: "s3", s.weed_master_port: "weed-master", s.weed_volume_port: "weed-volume",
                s.weed_filer_port: "weed-filer", s.weed_admin_port: "weed-admin"}
        if port in http:
            return http[port]
        return "grpc" if port - 10000 in http else "unknown"
    if service == "mlflow" and port == s.mlflow_port:
        return "mlflow"
    if service == "prefect-server" and port == s.prefect_port:
        return "prefect-server"
    if service == "api" and port == s.api_port:
        return "api"
    return "unknown"


def _grpc(s: Settings, port: int) -> tuple[bool, str]:
    """A plaintext gRPC server answers an HTTP/2 preface with its SETTINGS frame: anyone may call it. Otherwise
    the port wants TLS; it refuses us if the handshake without a client certificate fails, or the first read does
    (TLS 1.3 servers send their certificate request's verdict after the handshake)."""
    with socket.create_connection((s.host, port), timeout=5) as sock:
        sock.sendall(H2_PREFACE)
        try:
            head = sock.recv(9)
        except OSError:
            head = b""
    if len(head) == 9 and head[3] == 0x04:
        return False, "plaintext HTTP/2 (gRPC) accepted without credentials"
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((s.host, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=s.host) as tls:
            tls.sendall(H2_PREFACE)
            data = tls.recv(9)
    except (ssl.SSLError, OSError) as e:
        return True, f"TLS without a client certificate refused ({type(e).__name__})"
    if data:
        return False, "TLS accepted without a client certificate"
    return True, "TLS without a client certificate: closed"


def probe(s: Settings, service: str, port: int) -> SocketFinding:
    kind = _kind(s, service, port)
    if kind == "grpc":
        refused, how = _grpc(s, port)
    else:
        refused, how = stack.probe_refused(f"http://{s.host}:{port}", kind)
    return SocketFinding(kind if kind != "unknown" else service, port, refused, how)


# Files that hold secrets or records (credentials, server configs and keys, databases, logs, pid files):
# their owner's alone. Anything else under ESD_HOME (data blocks SeaweedFS writes 0644, model blobs) must at least
# not be writable by others; ESD_HOME itself is 0700, so none of it is reachable by another user anyway.
PRIVATE_SUFFIXES = (".json", ".ini", ".toml", ".key", ".crt", ".db", ".db-shm", ".db-wal", ".log", ".pid")


def file_findings(s: Settings) -> list[str]:
    """What under ESD_HOME breaks those rules."""
    bad = []
    if not s.home.exists():
        return bad
    if stat.S_IMODE(s.home.stat().st_mode) & 0o077:
        bad.append(f"{s.home} is {oct(stat.S_IMODE(s.home.stat().st_mode))} (want 0700)")
    for root, dirs, files in os.walk(s.home):
        for name in dirs + files:
            p = Path(root) / name
            try:
                mode = stat.S_IMODE(p.lstat().st_mode)
            except OSError:
                continue
            if p.is_symlink():
                continue
            if mode & 0o022:
                bad.append(f"{p} is {oct(mode)}: writable by others")
            elif p.is_file() and name.endswith(PRIVATE_SUFFIXES) and mode & 0o077:
                bad.append(f"{p} is {oct(mode)}: readable by others")
    return bad


def secrets_of(s: Settings) -> dict[str, str]:
    """Every secret the stack uses, by name."""
    out = {}
    if (s.home / "credentials.json").exists():
        out |= {k: s.generated(k) for k in GENERATED}
    for name, value in (("s3_secret_key", (s.s3_keys() or ("", ""))[1]),
                        ("mlflow_password", (s.mlflow_credentials() or ("", ""))[1]),
                        ("prefect_auth_string", s.prefect_auth() or "")):
        if value:
            out[name] = value
    out.pop("s3_access_key", None), out.pop("s3_reader_access_key", None)     # key ids, not secrets
    if "prefect_auth_string" in out:
        out["prefect_password"] = out["prefect_auth_string"].split(":", 1)[-1]
    return {k: v for k, v in out.items() if len(v) >= 8}


def _places(s: Settings) -> list[tuple[str, str]]:
    """(where, text) of everything a secret must not appear in."""
    places = []
    for log in sorted((s.home / "logs").glob("*.log")):
        places.append((f"log {log.name}", log.read_text(errors="replace")))
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                places.append((f"command line of pid {d.name}",
                               (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
            except OSError:
                pass
    for pid_file in sorted((s.home / "run").glob("*.pid")):
        places.append((f"pid file {pid_file.name}", pid_file.read_text()))
    places += _mlflow_places(s) + _prefect_places(s)
    return places


def _mlflow_places(s: Settings) -> list[tuple[str, str]]:
    from mlflow import MlflowClient

    os.environ.update(s.mlflow_env())
    client = MlflowClient(s.tracking_uri)
    out = []
    for exp in client.search_experiments(max_results=1000):
        out.append((f"MLflow experiment {exp.name}", repr(exp.tags)))
        for run in client.search_runs([exp.experiment_id], max_results=5000):
            out.append((f"MLflow run {run.info.run_id}", repr(run.data.params) + repr(run.data.tags)))
    for rm in client.search_registered_models(max_results=1000):
        out.append((f"MLflow model {rm.name}", repr(rm.tags)))
        for mv in client.search_model_versions(f"name='{rm.name}'", max_results=1000):
            out.append((f"MLflow model {rm.name} v{mv.version}", repr(mv.tags)))
    return out


def _prefect_places(s: Settings) -> list[tuple[str, str]]:
    from infra import prefect_server

    r = prefect_server.api(s, "POST", "/flow_runs/filter", {"limit": 200})
    r.raise_for_status()
    return [(f"Prefect flow run {fr['name']}", repr(fr.get("parameters")) + repr(fr.get("job_variables")))
            for fr in r.json()]


def audit(s: Settings) -> dict:
    sockets = [probe(s, service, port) for service, port in listening(s)]
    files = file_findings(s)
    known = secrets_of(s)
    found = sorted({f"{name} in {where}" for where, text in _places(s) for name, value in known.items()
                    if value in text})
    return {"sockets": [asdict(f) for f in sockets], "files_ok": not files, "file_findings": files,
            "secrets_found": found}
