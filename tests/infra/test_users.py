"""Users, roles and credentials (infra.users), without servers."""

import json
import stat

import pytest

from infra import users
from infra.settings import Settings


@pytest.fixture
def s(tmp_path):
    return Settings(home=tmp_path / "home")


def test_a_credential_is_shown_once_and_kept_only_as_its_hash(s):
    user, token = users.add(s, "ana.ops", "operator")
    assert user.role == "operator" and token.startswith(users.TOKEN_PREFIX) and len(token) > 40
    path = s.home / "users.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text() and set(json.loads(path.read_text())["ana.ops"]) == {"role", "sha256", "created"}
    assert users.authenticate(s, token) == user
    assert users.authenticate(s, token[:-1] + ("x" if token[-1] != "x" else "y")) is None
    assert users.authenticate(s, None) is None and users.authenticate(s, "") is None
    users.remove(s, "ana.ops")
    assert users.authenticate(s, token) is None


@pytest.mark.parametrize("name, role, message", [
    ("Ana", "operator", "user name"), ("a", "operator", "user name"), ("ana ops", "operator", "user name"),
    ("ana", "admin", "unknown role"), ("ana", "", "unknown role")])
def test_bad_names_and_roles_are_refused_and_nothing_is_written(s, name, role, message):
    with pytest.raises(ValueError, match=message):
        users.add(s, name, role)
    assert users.list_users(s) == []


def test_one_name_one_user(s):
    users.add(s, "sam", "submitter")
    with pytest.raises(ValueError, match="already exists"):
        users.add(s, "sam", "operator")
    assert [(u.name, u.role) for u in users.list_users(s)] == [("sam", "submitter")]


def test_roles_are_checked_and_the_refusal_names_them():
    sam = users.User("sam", "submitter")
    assert users.require(sam, "submitter", "operator", what="filing") is sam
    with pytest.raises(users.AuthError, match="user sam is a submitter; promote needs role operator"):
        users.require(sam, "operator", what="promote")
    with pytest.raises(users.AuthError, match="needs a credential"):
        users.require(None, "operator", what="promote")


def test_the_command_line_acts_as_its_token_or_the_administrator(s, monkeypatch):
    monkeypatch.delenv("ESD_TOKEN", raising=False)
    assert users.command_line_user(s, "operator", what="promote").actor.startswith("admin:")
    _, token = users.add(s, "olga", "operator")
    monkeypatch.setenv("ESD_TOKEN", token)
    assert users.command_line_user(s, "operator", what="promote").actor == "olga"
    with pytest.raises(users.AuthError, match="for the administrator"):
        users.command_line_user(s, what="adding a user")
    monkeypatch.setenv("ESD_TOKEN", "esd_forged")
    with pytest.raises(users.AuthError, match="not a valid credential"):
        users.command_line_user(s, "operator", what="promote")
