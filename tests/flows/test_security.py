"""Nobody gets in where they do not belong: every socket the stack opened tried without credentials, the worker's
job template, the read-only S3 identity, file modes, and the stack's secrets looked for after a takedown."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from flows.cli import build_app
from tests.conftest import FAST_METHOD

APP = build_app()


def test_every_socket_the_stack_opened_refuses_an_anonymous_request(full_stack):
    from infra import audit, stack

    found = {(f.server, f.port): f for f in (audit.probe(full_stack, *sp) for sp in audit.listening(full_stack))}
    s = full_stack
    ports = {p for _, p in found}
    # the listing is read from /proc, not from settings: every port the settings name is among what it found
    assert {s.s3_port, s.mlflow_port, s.prefect_port, s.weed_master_port, s.weed_volume_port, s.weed_filer_port,
            s.weed_admin_port} <= ports
    assert {s.weed_master_port + 10000, s.weed_volume_port + 10000, s.weed_filer_port + 10000} <= ports
    answered = sorted(f"{f.server}:{f.port} ({f.how})" for f in found.values() if not f.anonymous_refused)
    assert not answered
    assert sum(f.server == "grpc" for f in found.values()) >= 5
    # the master's HTTP API is off: no file id and write token, no volume growth for an anonymous caller
    for path in ("/dir/assign", "/vol/grow"):
        refused, how = stack.anonymous_request(f"http://{s.host}:{s.weed_master_port}", "GET", path)
        assert how.startswith("HTTP 404 ") or refused, how


def test_the_same_requests_with_credentials_succeed(full_stack):
    from infra import prefect_server

    s = full_stack
    assert prefect_server.api(s, "POST", "/flows/filter", {}).status_code == 200
    user, password = s.mlflow_credentials()
    req = urllib.request.Request(f"{s.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1")
    import base64

    req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    assert s.s3_bucket in [b["Name"] for b in s.s3_client().list_buckets()["Buckets"]]


def test_nobody_moves_production_without_mlflow_credentials(platform):
    body = json.dumps({"name": "toy-sd", "alias": "production", "version": "1"}).encode()
    req = urllib.request.Request(f"{platform.settings.tracking_uri}/api/2.0/mlflow/registered-models/alias",
                                 data=body, method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401


def test_a_flow_run_cannot_choose_the_workers_command_or_environment(platform):
    from prefect.client.orchestration import get_client

    from flows.deploy import locked_job_template, prefect_api

    with prefect_api(platform.settings.prefect_api), get_client(sync_client=True) as client:
        pool = client.read_work_pool(platform.settings.work_pool)
        assert pool.base_job_template == locked_job_template(pool.base_job_template)
        assert not {"command", "env", "working_dir"} & set(pool.base_job_template["variables"]["properties"])
        deployment = client.read_deployment_by_name("takedown/takedown")
        for variables in ({"command": "sh -c 'touch /tmp/pwned'"}, {"env": {"PYTHONPATH": "/tmp"}}):
            with pytest.raises(Exception, match="(?i)additional properties|validation|not allowed|422|409"):
                client.create_flow_run_from_deployment(deployment.id, parameters={}, job_variables=variables)


def test_the_reader_key_reads_but_cannot_write(full_stack):
    from botocore.exceptions import ClientError

    from infra import s3

    s = full_stack
    reader = s3.client(s.s3_url, s.s3_region, s.s3_reader_keys())
    assert reader.get_object(Bucket=s.s3_bucket, Key=".esd-ready")["Body"].read() == b"ok"
    for write in (lambda: reader.put_object(Bucket=s.s3_bucket, Key="intruder", Body=b"x"),
                  lambda: reader.delete_object(Bucket=s.s3_bucket, Key=".esd-ready"),
                  lambda: reader.create_bucket(Bucket="other")):
        with pytest.raises(ClientError, match="AccessDenied"):
            write()
    assert s.s3_client().get_object(Bucket=s.s3_bucket, Key=".esd-ready")["Body"].read() == b"ok"


def test_no_secret_in_logs_command_lines_mlflow_or_prefect_after_a_takedown(platform):
    r = CliRunner().invoke(APP, ["request", "submit", "Vela Moreau", "--kind", "style", "--method", FAST_METHOD,
                                 "--requester", "SEC-1", "--wait", "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(APP, ["stack", "audit", "--json"])
    result = json.loads(r.output)
    assert result["secrets_found"] == [] and result["files_ok"], result["file_findings"][:5]
    from infra import audit

    assert len(audit.secrets_of(platform.settings)) >= 6      # the scan looked for every secret of the stack
    status = CliRunner().invoke(APP, ["stack", "status"])
    assert status.output.count("auth on") == 4, status.output      # S3, MLflow, Prefect, the API's status reads
