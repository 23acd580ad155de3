"""`esd stack up | down | status`: the local services of infra.stack."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

from infra import stack
from infra.settings import Settings

stack_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="The local stack: S3 (SeaweedFS), MLflow server, Prefect server and worker.")


def _print(rows: list[stack.ServiceStatus], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    for r in rows:
        where = f"pid {r.pid}" if r.pid else ("external" if not r.managed else "not started by this stack")
        typer.echo(f"{r.name:<15} {'up' if r.up else 'down':<5} {r.address:<28} {where}")


@stack_app.command()
def up(as_json: bool = typer.Option(False, "--json")) -> None:
    """Start what is not running (data kept under ESD_HOME, default ./.esd)."""
    try:
        rows = stack.up(Settings())
    except stack.StackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    _print(rows, as_json)


@stack_app.command()
def down() -> None:
    """Stop the services this stack started (data is kept)."""
    stopped = stack.down(Settings())
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")


@stack_app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Each service: up or down, and its address. Exit status 1 if any is down."""
    rows = stack.status(Settings())
    _print(rows, as_json)
    if not all(r.up for r in rows):
        raise typer.Exit(1)
