"""Settings: ESD_* variables, random keys kept in the data dir, local versus external services."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from infra.settings import Settings


def test_env_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("ESD_HOME", str(tmp_path))
    monkeypatch.setenv("ESD_S3_PORT", "18999")
    monkeypatch.setenv("ESD_MLFLOW_BACKEND_STORE_URI", "postgresql://root@127.0.0.1:5432/mlflow")
    s = Settings()
    assert s.home == tmp_path and s.s3_url == "http://127.0.0.1:18999"
    assert s.backend_store_uri == "postgresql+psycopg2://root@127.0.0.1:5432/mlflow"   # the installed driver


def test_defaults_are_local_sqlite_under_home(tmp_path):
    s = Settings(home=tmp_path)
    assert s.local_s3 and s.local_mlflow
    assert s.backend_store_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert s.artifacts_destination == "s3://esd/mlflow"
    assert s.tracking_uri.startswith("http://127.0.0.1:")
    used = {s.s3_port, s.weed_master_port, s.weed_volume_port, s.weed_filer_port, s.weed_admin_port, s.mlflow_port}
    taken = {5432, 6379, 3306, 5672, 4222, 1883, 8888}
    assert not used & taken and not {p + 10000 for p in used} & taken


def test_keys_are_random_private_and_kept(tmp_path):
    a = Settings(home=tmp_path / "a").s3_keys()
    assert a == Settings(home=tmp_path / "a").s3_keys()            # kept across starts
    assert a != Settings(home=tmp_path / "b").s3_keys()            # not a shared default
    assert len(a[1]) >= 30 and a[0] not in ("admin", "minioadmin", "any")
    assert stat.S_IMODE((tmp_path / "a" / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700


def test_every_local_service_gets_its_own_generated_credentials(tmp_path):
    s = Settings(home=tmp_path)
    user, password = s.mlflow_credentials()
    reader = s.s3_reader_keys()
    auth = s.prefect_auth()
    assert len(password) >= 24 and auth.startswith("esd:") and len(auth) > 20
    assert reader != s.s3_keys() and len({password, auth, reader[1], s.s3_keys()[1]}) == 4
    # every client reads them from the same place
    assert s.client_env()["PREFECT_API_AUTH_STRING"] == auth
    assert s.client_env()["MLFLOW_TRACKING_PASSWORD"] == password and s.client_env()["MLFLOW_TRACKING_USERNAME"] == user
    assert Settings(home=tmp_path).mlflow_credentials() == (user, password)
    # given ones win, and an external service without any gets none
    given = Settings(home=tmp_path, mlflow_password="pw", prefect_auth_string="u:p")
    assert given.mlflow_credentials() == ("esd-admin", "pw") and given.prefect_auth() == "u:p"
    external = Settings(home=tmp_path / "x", mlflow_tracking_uri="https://m.example.org",
                        prefect_api_url="https://p.example.org/api")
    assert external.mlflow_credentials() is None and external.prefect_auth() is None
    assert not (tmp_path / "x" / "credentials.json").exists()


def test_external_services(tmp_path):
    s = Settings(home=tmp_path, s3_endpoint="https://s3.example.org", mlflow_tracking_uri="https://mlflow.example.org",
                 s3_access_key="AK", s3_secret_key="SK")
    assert not s.local_s3 and not s.local_mlflow
    assert s.s3_url == "https://s3.example.org" and s.tracking_uri == "https://mlflow.example.org"
    assert s.s3_keys() == ("AK", "SK") and not (tmp_path / "credentials.json").exists()
    assert Settings(home=tmp_path, s3_endpoint="https://s3.example.org").s3_keys() is None   # boto3's own chain


@pytest.mark.parametrize("command, name, value, message", [
    ("status", "ESD_EVAL_COLORS", "5", "setting ESD_EVAL_COLORS is refused: Input should be less than or equal to 3"),
    ("status", "ESD_EVAL_STEPS", "many", "setting ESD_EVAL_STEPS is refused: Input should be a valid integer"),
    # the settings the platform's `stack up` checks before starting anything (the gate's, the operator's erase ones)
    ("up", "ESD_ERASE_DEFAULTS", '{"uce-tokens-adv": {"attack_steps": 0}}',
     "ESD_ERASE_DEFAULTS: uce-tokens-adv (style): attack_steps"),
    ("up", "ESD_GATE_STYLE", '{"max_rate": 0.1}', "gate setting ESD_GATE_STYLE is refused"),
])
def test_a_refused_setting_is_one_line_from_the_console_script(tmp_path, command, name, value, message):
    home = tmp_path / "home"
    env = os.environ | {"ESD_HOME": str(home), name: value}
    r = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "stack", command], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith(f"error: {message}") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if command == "status":
        assert not home.exists()                      # refused as settings are read: nothing written
    else:                                             # nothing started: only the credentials every command makes
        assert {p.name for p in home.iterdir()} <= {"credentials.json", ".credentials.lock"}

