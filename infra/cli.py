"""`esd stack up | down | status`: the local services of infra.stack."""

from __future__ import annotations

import json
from dataclasses import asdict
from enum import Enum
from typing import Callable

import typer

from infra import stack, users
from infra.errors import errors_as_one_line
from infra.settings import Settings

AS_JSON = typer.Option(False, "--json", help="print JSON")
Role = Enum("Role", {r: r for r in users.ROLES}, type=str)


def stack_errors() -> tuple[type[BaseException], ...]:
    return stack.StackError, OSError


one_line_errors = errors_as_one_line(stack_errors)


def _print(rows: list[stack.ServiceStatus], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    for r in rows:
        where = f"pid {r.pid}" if r.pid else ("external" if not r.managed else "not started by this stack")
        auth = {True: "auth on", False: "AUTH OFF", None: "-"}[r.auth]
        typer.echo(f"{r.name:<15} {'up' if r.up else 'down':<5} {r.address:<28} {auth:<9} {where}")


def stack_app(up: Callable[[Settings], list[stack.ServiceStatus]] = stack.up,
              errors: Callable[[], tuple[type[BaseException], ...]] = lambda: ()) -> typer.Typer:
    """The `stack` commands; UP starts the services (the platform passes one that also deploys its flows and checks
    its settings first: ERRORS names what it refuses with, each then one line as the stack's own errors)."""
    app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="The local stack: S3 (SeaweedFS), MLflow server, Prefect server and worker.")

    @app.command("up")
    @errors_as_one_line(lambda: stack_errors() + errors())
    def up_cmd(as_json: bool = AS_JSON) -> None:
        """Start what is not running (data kept under ESD_HOME, default ./.esd)."""
        _print(up(Settings()), as_json)

    @app.command()
    @one_line_errors
    def down() -> None:
        """Stop the services this stack started (data is kept)."""
        stopped = stack.down(Settings())
        typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")

    @app.command()
    @one_line_errors
    def status(as_json: bool = AS_JSON) -> None:
        """Each service: up or down, and its address. Exit status 1 if any is down."""
        rows = stack.status(Settings())
        _print(rows, as_json)
        if not all(r.up for r in rows):
            raise typer.Exit(1)

    @app.command()
    @one_line_errors
    def audit(as_json: bool = AS_JSON) -> None:
        """Every listening socket the stack opened, tried without credentials; file modes under ESD_HOME; the
        stack's secrets looked for in logs, command lines, MLflow and Prefect. Exit status 1 on any finding."""
        from infra import audit as audit_lib

        result = audit_lib.audit(Settings())
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        else:
            for f in result["sockets"]:
                verdict = "refused" if f["anonymous_refused"] else "ANSWERED"
                typer.echo(f"{f['server']:<15} {f['port']:<6} {verdict:<9} {f['how']}")
            for line in result["file_findings"]:
                typer.echo(f"file: {line}")
            for line in result["secrets_found"]:
                typer.echo(f"secret: {line}")
            typer.echo(f"files {'ok' if result['files_ok'] else 'NOT ok'}; "
                       f"{len(result['secrets_found'])} secret(s) found")
        if not (all(f["anonymous_refused"] for f in result["sockets"]) and result["files_ok"]
                and not result["secrets_found"]):
            raise typer.Exit(1)

    return app


def user_app() -> typer.Typer:
    """The `user` commands: who may file, operate or read (infra.users)."""
    app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="Users and their roles: submitter, operator, reader.")
    user_errors = errors_as_one_line(lambda: (ValueError, PermissionError, stack.StackError, OSError))

    @app.command("add")
    @user_errors
    def add(name: str = typer.Argument(..., help="the user's name, e.g. ana.ops"),
            role: Role = typer.Option(..., help="; ".join(f"{r}: {d}" for r, d in users.ROLES.items()))) -> None:
        """Add a user and print their credential, once (only its hash is kept)."""
        s = Settings()
        users.command_line_user(s, what="adding a user")
        user, token = users.add(s, name, role.value)
        try:
            extra = users.provision(s, user, token)
        except Exception as exc:
            users.remove(s, name)
            raise ValueError(f"cannot give {name} their {role.value} access: {str(exc).splitlines()[0]}") from None
        typer.echo(f"user {user.name} ({user.role}) added; credential, shown once: {token}")
        for k, v in extra.items():
            typer.echo(f"  {k}={v}")

    @app.command("list")
    @user_errors
    def list_cmd(as_json: bool = AS_JSON) -> None:
        """Every user and role (no credentials)."""
        rows = users.list_users(Settings())
        if as_json:
            typer.echo(json.dumps([asdict(u) for u in rows], indent=2))
            return
        for u in rows:
            typer.echo(f"{u.name:<24} {u.role:<10} since {u.created}")

    @app.command("remove")
    @user_errors
    def remove(name: str = typer.Argument(..., help="the user to remove")) -> None:
        """Remove a user: their credential stops working at once."""
        s = Settings()
        users.command_line_user(s, what="removing a user")
        user = users.remove(s, name)
        users.deprovision(s, user)
        typer.echo(f"user {name} removed")

    return app
