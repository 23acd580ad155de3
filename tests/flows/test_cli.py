"""The `esd` command line as a user meets it: grouped help, help on every option, enums, one-line errors,
valid JSON, and no stack needed to ask for help."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer

from flows.cli import Kind, Status, build_app
from tests.conftest import stack_settings

ESD = [sys.executable, "-c", "from flows.cli import main; main()"]


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(ESD + args, capture_output=True, text=True, timeout=120, env=os.environ | (env or {}))


def walk(command, path=("esd",)):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, path + (name,))


def test_every_command_and_option_has_help():
    root = typer.main.get_command(build_app())
    missing = []
    for path, command in walk(root):
        if not (command.help or "").strip():
            missing.append(" ".join(path))
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help" and not (param.help or "").strip():
                missing.append(f"{' '.join(path)} {param.opts[0]}")
    assert not missing, missing


def test_root_help_groups_commands():
    r = run(["--help"])
    assert r.returncode == 0
    for panel in ("Engine", "Platform", "Registry", "Stack"):
        assert panel in r.stdout
    assert r.stderr == ""


def test_choices_are_the_records_own():
    from flows.requests import KINDS, STATUSES

    assert tuple(k.value for k in Kind) == KINDS and tuple(s.value for s in Status) == STATUSES


@pytest.mark.parametrize("args, message", [
    (["request", "submit", "circle", "--kind", "weather"], "'weather' is not one of 'style', 'object'"),
    (["model", "promote", "toy-sd", "2", "--reason", "x", "--alias", "staging"], "'staging' is not one of"),
    (["toy", "build", "--unet-steps", "0"], "--unet-steps"),
    (["bench", "speed", "--configs", "huge"], "unknown config 'huge'; choose from: toy, mid"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_bad_input_is_one_line(args, message):
    r = run(args)
    assert r.returncode in (1, 2)
    assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_json_output_is_valid_with_nothing_running(tmp_path):
    s = stack_settings(tmp_path)
    env = {k: v for k, v in s.to_env().items() if k.startswith(("ESD_HOME", "ESD_S3_PORT", "ESD_MLFLOW_PORT",
                                                                 "ESD_PREFECT_PORT", "ESD_API_PORT"))}
    r = run(["stack", "status", "--json"], env)
    assert r.returncode == 1
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} == {"seaweedfs", "mlflow", "prefect-server", "prefect-worker", "api"}
    assert not any(row["up"] for row in rows) and all(row["auth"] is None for row in rows)

