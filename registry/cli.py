"""`esd model ...` and `esd base import`: the registry from the command line. Errors are one line, exit 1."""

from __future__ import annotations

import getpass
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from esd.cli import errors_as_one_line, fail

model_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Registered versions, aliases and history.")
base_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Base models.")

# Run after `esd model promote` moves production: (name, version). The platform adds one that moves the
# version's held or candidate requests to promoted, as the promote flow does.
AFTER_PROMOTE: list = []
ACTOR = typer.Option(None, help="who moves the alias (a name or ticket; default: the local user)")
AS_JSON = typer.Option(False, "--json", help="print JSON")


def _registry_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from mlflow.exceptions import MlflowException

    from registry.store import RegistryError

    return MlflowException, RegistryError, BotoCoreError, ClientError, OSError


one_line_errors = errors_as_one_line(_registry_errors)


def _store():
    from infra.settings import Settings
    from infra.stack import healthy

    settings = Settings()
    # Fail fast: the MLflow client would otherwise retry a dead server for minutes.
    if not healthy(f"{settings.tracking_uri}/health"):
        fail(f"MLflow server at {settings.tracking_uri} is not answering (start it with `esd stack up`)")
    return settings.store()


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M") if ms else ""


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "(none)"


def _describe(r: dict) -> str:
    if r["kind"] == "base":
        return "base"
    return f"{r['method']} erased {', '.join(r['concepts'])} (on v{r['parent_version']})"


@model_app.command("list")
@one_line_errors
def list_cmd(name: str, erased: Optional[str] = typer.Option(None, help="only versions with this concept erased"),
             as_json: bool = AS_JSON) -> None:
    """Every version of NAME (or only those with a concept erased)."""
    from registry.versions import list_versions

    rows = list_versions(_store(), name, erased=erased)
    if as_json:
        return _echo_json(rows)
    for r in rows:
        aliases = f"[{', '.join(r['aliases'])}]" if r["aliases"] else ""
        typer.echo(f"v{r['version']:<4} {_when(r['created']):<17} {_describe(r):<50} {r['stored_bytes']:>13,d} B  {aliases}")


@model_app.command()
@one_line_errors
def show(name: str, version: int, as_json: bool = AS_JSON) -> None:
    """One version: what it erased, where it is stored, its bytes against the full UNet."""
    from registry.versions import show as show_version

    info = show_version(_store(), name, version)
    if as_json:
        return _echo_json(info)
    fraction = f" ({info['stored_fraction_of_unet']:.2%} of the full UNet)" if info["stored_fraction_of_unet"] else ""
    for key, value in [("version", f"{name} v{info['version']}"), ("what", _describe(info)),
                       ("erased", ", ".join(info["erased"]) or "-"), ("requests", ", ".join(info["request_ids"]) or "-"),
                       ("aliases", ", ".join(info["aliases"]) or "-"),
                       ("stored", f"{info['stored_bytes']:,d} bytes{fraction}"),
                       ("unet", f"{info['unet_bytes']:,d} bytes"), ("source", info["source"]),
                       ("run", info["run_id"]), ("base sha256", info["base_sha256"]),
                       ("delta sha256", info["delta_sha256"] or "-")]:
        typer.echo(f"{key:<13} {value}")


@model_app.command()
@one_line_errors
def lineage(name: str, version: int, as_json: bool = AS_JSON) -> None:
    """The chain from VERSION back to its base, and what each step erased."""
    from registry.versions import lineage as version_lineage

    chain = version_lineage(_store(), name, version)
    if as_json:
        return _echo_json(chain)
    for r in chain:
        typer.echo(f"v{r['version']:<4} {_describe(r)}")


@model_app.command()
@one_line_errors
def history(name: str, as_json: bool = AS_JSON) -> None:
    """Every alias move: time, actor, reason, from -> to."""
    from registry.aliases import history as alias_history

    events = alias_history(_store(), name)
    if as_json:
        return _echo_json(events)
    for e in events:
        typer.echo(f"{e['time']}  {e['alias']:<10} {e['action']:<8} {_v(e['from'])} -> {_v(e['to'])}  "
                   f"by {e['actor']}: {e['reason']}")


@model_app.command()
@one_line_errors
def promote(name: str, version: int, reason: str = typer.Option(..., help="why (recorded in the history)"),
            actor: Optional[str] = ACTOR, alias: str = typer.Option("production", help="production or candidate"),
            force: bool = typer.Option(False, "--force", help="promote a version that failed its gate"),
            as_json: bool = AS_JSON) -> None:
    """Point an alias at VERSION, after checking its stored files (and, for production, its gate)."""
    from registry.aliases import promote as promote_version

    event = promote_version(_store(), name, version, reason, actor or getpass.getuser(), alias=alias, force=force)
    if alias == "production":
        for hook in AFTER_PROMOTE:
            hook(name, version)
    if as_json:
        return _echo_json(event)
    typer.echo(f"{name} {alias}: {_v(event['from'])} -> {_v(event['to'])}" if event["changed"]
               else f"{name} {alias} is already v{version}")


@model_app.command()
@one_line_errors
def rollback(name: str, reason: str = typer.Option(..., help="why (recorded in the history)"),
             to: Optional[int] = typer.Option(None, help="version (default: the previous production)"),
             actor: Optional[str] = ACTOR, as_json: bool = AS_JSON) -> None:
    """Move production back (by default to the previous production version)."""
    from registry.aliases import rollback as rollback_version

    event = rollback_version(_store(), name, reason, actor or getpass.getuser(), to=to)
    if as_json:
        return _echo_json(event)
    typer.echo(f"{name} production: {_v(event['from'])} -> {_v(event['to'])}")


@base_app.command("import")
@one_line_errors
def base_import(path: Path, name: str = typer.Option(..., help="registered model name, e.g. toy-sd"),
                as_json: bool = AS_JSON) -> None:
    """Register a diffusers Stable Diffusion folder as version 1 of NAME."""
    from registry.versions import import_base

    info = import_base(_store(), path, name)
    if as_json:
        return _echo_json(info)
    typer.echo(f"registered {name} v{info['version']}: {info['stored_bytes']:,d} bytes, unet {info['unet_bytes']:,d} bytes")
