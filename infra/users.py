"""Who may do what: named users with one role each, their credentials made once and kept only as hashes.

    submitter  files takedown requests and reads the status of their own
    operator   promotes, holds, rolls back and withdraws (force included), always with a reason
    reader     loads models: an MLflow account that may read the registered models, and the S3 read-only key

A credential is a random token shown once by `esd user add`; ESD_HOME/users.json (0600) keeps its sha256. The
HTTP API takes it as `Authorization: Bearer <token>`; the command line takes it from ESD_TOKEN. Whoever acts is
recorded by the name the credential proves: a user's name, or `admin:<login>` for the holder of ESD_HOME's own
credentials (the machine's administrator, who needs no token), never a name someone typed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from infra.settings import Settings, actor, home_lock, write_private

ROLES = {"submitter": "files takedown requests and reads the status of their own",
         "operator": "promotes, holds, rolls back and withdraws requests and versions, with a reason",
         "reader": "loads models: reads the registered models in MLflow and the store with the S3 read-only key"}
NAME = re.compile(r"^[a-z][a-z0-9._-]{1,39}$")
TOKEN_PREFIX = "esd_"


class AuthError(PermissionError):
    """No credential, a wrong one, or a role that may not do this; the message says which in one line."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    created: str = ""

    @property
    def actor(self) -> str:
        """The name recorded for what this user does."""
        return self.name


def _path(s: Settings):
    return s.home / "users.json"


def _read(s: Settings) -> dict:
    path = _path(s)
    return json.loads(path.read_text()) if path.exists() else {}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add(s: Settings, name: str, role: str) -> tuple[User, str]:
    """A new user and their token (shown once; only its hash is kept)."""
    if not NAME.match(name or ""):
        raise ValueError(f"user name {name!r}: 2-40 characters, lower-case letters, digits, '.', '_' or '-', "
                         f"starting with a letter")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of: {', '.join(ROLES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with home_lock(s.home, "users"):
        users = _read(s)
        if name in users:
            raise ValueError(f"user {name} already exists (remove it first to issue a new credential)")
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        users[name] = {"role": role, "sha256": _digest(token), "created": created}
        write_private(_path(s), json.dumps(users, indent=1))
    return User(name, role, created), token


def remove(s: Settings, name: str) -> User:
    with home_lock(s.home, "users"):
        users = _read(s)
        if name not in users:
            raise ValueError(f"no user {name}")
        gone = users.pop(name)
        write_private(_path(s), json.dumps(users, indent=1))
    return User(name, gone["role"], gone["created"])


def list_users(s: Settings) -> list[User]:
    return [User(n, u["role"], u["created"]) for n, u in sorted(_read(s).items())]


def authenticate(s: Settings, token: str | None) -> User | None:
    """The user whose credential this is, or None."""
    if not token or not token.startswith(TOKEN_PREFIX):
        return None
    digest = _digest(token)
    for name, u in _read(s).items():
        if hmac.compare_digest(digest, u["sha256"]):
            return User(name, u["role"], u["created"])
    return None


def require(user: User | None, *roles: str, what: str) -> User:
    """USER if their role is one of ROLES, else AuthError naming what was refused."""
    if not roles:
        raise AuthError(f"{what} is for the administrator (ESD_HOME's own credentials, without ESD_TOKEN)")
    if user is None:
        raise AuthError(f"{what} needs a credential of role {' or '.join(roles)}")
    if user.role not in roles:
        raise AuthError(f"user {user.name} is a {user.role}; {what} needs role {' or '.join(roles)}")
    return user


def administrator() -> User:
    """The holder of ESD_HOME's credentials (the command line without ESD_TOKEN): every role."""
    return User(actor(), "admin")


def command_line_user(s: Settings, *roles: str, what: str) -> User:
    """Who runs this command: the user ESD_TOKEN proves (who must hold one of ROLES), else the administrator.
    A token that proves nobody is refused rather than ignored."""
    token = os.environ.get("ESD_TOKEN")
    if not token:
        return administrator()
    user = authenticate(s, token)
    if user is None:
        raise AuthError("ESD_TOKEN is not a valid credential (esd user add issues one)")
    return require(user, *roles, what=what)


READER_ROLE = "esd-reader"      # the MLflow role every reader is given: READ on every registered model and experiment


class _MlflowAdmin:
    """MLflow's auth client, each call made as the platform's administrator."""

    def __init__(self, s: Settings):
        from mlflow.server.auth.client import AuthServiceClient

        self.client, self.env = AuthServiceClient(s.tracking_uri), s.mlflow_env()

    def __getattr__(self, name):
        from infra.env import environ

        call = getattr(self.client, name)

        def as_admin(*args, **kwargs):
            with environ(self.env):
                return call(*args, **kwargs)
        return as_admin


def provision(s: Settings, user: User, token: str) -> dict[str, str]:
    """What a new user needs outside this file: a reader gets an MLflow account (password: the token) in the
    esd-reader role, and the S3 read-only key. Returns what to tell them."""
    if user.role != "reader":
        return {}
    client = _MlflowAdmin(s)
    client.create_user(user.name, token)
    roles = {r.name: r for r in client.list_roles("default")}
    role = roles.get(READER_ROLE)
    if role is None:
        role = client.create_role("default", READER_ROLE, "loads models: reads every registered model")
        for kind in ("registered_model", "experiment"):
            client.add_role_permission(role.id, kind, "*", "READ")
    client.assign_role(user.name, role.id)
    out = {"ESD_MLFLOW_USERNAME": user.name, "ESD_MLFLOW_PASSWORD": token}
    keys = s.s3_reader_keys()
    if keys:
        out |= {"ESD_S3_ACCESS_KEY": keys[0], "ESD_S3_SECRET_KEY": keys[1]}
    return out


def deprovision(s: Settings, user: User) -> None:
    if user.role == "reader":
        _MlflowAdmin(s).delete_user(user.name)
