"""`esd base import` and `esd model ...` against the real stack, configured only through ESD_* variables."""

from __future__ import annotations

import json
import uuid

import pytest

from registry.store import Store
from tests.registry.conftest import run
from tests.registry.deltas import make_delta, mark_gate


def test_import_list_show_lineage_promote_history(env, stack, tiny_sd, tmp_path):
    name = f"toy-{uuid.uuid4().hex[:6]}"
    out = run(env, "base", "import", str(tiny_sd), "--name", name, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["version"] == 1
    import registry

    registry.register_erased(Store.from_settings(stack), name, make_delta(tiny_sd, tmp_path / "d", ["Vela Moreau"], seed=1))
    refused = run(env, "model", "promote", name, "2", "--reason", "not evaluated yet")
    assert refused.exit_code == 1 and "has not passed its gate" in refused.output
    mark_gate(Store.from_settings(stack), name, 2)

    listed = json.loads(run(env, "model", "list", name, "--json").stdout)
    assert [r["version"] for r in listed] == [1, 2]
    erased = json.loads(run(env, "model", "list", name, "--erased", "Vela Moreau", "--json").stdout)
    assert [r["version"] for r in erased] == [2]
    shown = json.loads(run(env, "model", "show", name, "2", "--json").stdout)
    assert shown["stored_bytes"] > 0 and shown["unet_bytes"] > shown["stored_bytes"]
    assert "stored" in run(env, "model", "show", name, "2").stdout
    chain = json.loads(run(env, "model", "lineage", name, "2", "--json").stdout)
    assert [(r["version"], r["concepts"]) for r in chain] == [(2, ["Vela Moreau"]), (1, [])]

    assert run(env, "model", "promote", name, "1", "--reason", "live").exit_code == 0
    assert run(env, "model", "promote", name, "2", "--reason", "opt-out REQ-7").exit_code == 0
    back = run(env, "model", "rollback", name, "--reason", "regression")
    assert back.exit_code == 0 and "v2 -> v1" in back.stdout
    events = json.loads(run(env, "model", "history", name, "--json").stdout)
    assert [(e["from"], e["to"], e["reason"]) for e in events] == [
        (None, 1, "live"), (1, 2, "opt-out REQ-7"), (2, 1, "regression")]
    # no name typed in: the administrator who holds ESD_HOME's credentials acted
    assert all(e["actor"].startswith("admin:") for e in events)
    assert "by admin:" in run(env, "model", "history", name).stdout


@pytest.mark.parametrize("args,message", [
    (("model", "show", "no-such-model", "1"), "no model version"),
    (("model", "promote", "no-such-model", "1", "--reason", "x"), "no model version"),
    (("model", "rollback", "no-such-model", "--reason", "x"), "no-such-model"),
    (("base", "import", "/nonexistent", "--name", "x"), "model folder not found"),
    (("model", "list", "toy' or name='other"), "model name \"toy' or name='other\" must be"),
    (("model", "show", "../etc", "1"), "not a model reference: '../etc/1'"),
    (("model", "history", "toy' or name='other"), "must be 1-100 letters"),
    (("base", "import", "/nonexistent", "--name", "a b"), "model name 'a b' must be"),
])
def test_errors_are_one_line(env, args, message):
    out = run(env, *args)
    assert out.exit_code == 1
    assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1
    assert "Traceback" not in out.output


def test_server_down_fails_fast(env):
    out = run(env | {"ESD_MLFLOW_PORT": "1"}, "model", "list", "toy-sd")
    assert out.exit_code == 1 and "not answering" in out.stderr
