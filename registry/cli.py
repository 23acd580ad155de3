"""`esd model ...` and `esd base import`: the registry from the command line. Errors are one line, exit 1.

Moving production also moves the requests a version serves, which the registry does not know about: the
platform hands its promotion path to `model_app`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer

from infra.errors import errors_as_one_line, fail

ACTOR = typer.Option(None, help="who moves the alias (a name or ticket; default: ESD_ACTOR or the local user)")
AS_JSON = typer.Option(False, "--json", help="print JSON")
REASON = typer.Option(..., help="why (recorded in the history)")
NAME = typer.Argument(..., help="registered model, e.g. toy-sd")
VERSION = typer.Argument(..., help="version number")


class Alias(str, Enum):
    production = "production"
    candidate = "candidate"


def registry_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from mlflow.exceptions import MlflowException

    from esd.delta import DeltaError
    from esd.models import ModelError
    from infra.errors import ReasonRequired
    from registry.store import RegistryError

    return MlflowException, RegistryError, ReasonRequired, DeltaError, ModelError, BotoCoreError, ClientError, OSError


one_line_errors = errors_as_one_line(registry_errors)


def open_store():
    """The registry from settings; fails fast (one line) when its MLflow server is not answering."""
    from infra.settings import Settings
    from infra.stack import healthy
    from registry.store import Store

    settings = Settings()
    # Fail fast: the MLflow client would otherwise retry a dead server for minutes.
    if not healthy(f"{settings.tracking_uri}/health"):
        fail(f"MLflow server at {settings.tracking_uri} is not answering (start it with `esd stack up`)")
    return Store.from_settings(settings)


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


def model_app(promote: Callable[..., dict], rollback: Callable[..., dict]) -> typer.Typer:
    """The `model` commands. PROMOTE(name, version, reason, actor, alias, force) and ROLLBACK(name, reason, actor,
    to) are the platform's promotion path, so the CLI moves exactly what the flows move."""
    app = typer.Typer(no_args_is_help=True, add_completion=False, help="Registered versions, aliases and history.")

    @app.command("list")
    @one_line_errors
    def list_cmd(name: str = typer.Argument(..., help="registered model, e.g. toy-sd"),
                 erased: Optional[str] = typer.Option(None, help="only versions with this concept erased"),
                 as_json: bool = AS_JSON) -> None:
        """Every version of NAME (or only those with a concept erased)."""
        from registry.versions import list_versions

        rows = list_versions(open_store(), name, erased=erased)
        if as_json:
            return _echo_json(rows)
        for r in rows:
            aliases = f"[{', '.join(r['aliases'])}]" if r["aliases"] else ""
            typer.echo(f"v{r['version']:<4} {_when(r['created']):<17} {_describe(r):<50} {r['stored_bytes']:>13,d} B  "
                       f"{aliases}")

    @app.command()
    @one_line_errors
    def show(name: str = NAME, version: int = VERSION, as_json: bool = AS_JSON) -> None:
        """One version: what it erased, where it is stored, its bytes against the full UNet."""
        from registry.versions import show as show_version

        info = show_version(open_store(), name, version)
        if as_json:
            return _echo_json(info)
        fraction = f" ({info['stored_fraction_of_unet']:.2%} of the full UNet)" if info["stored_fraction_of_unet"] else ""
        for key, value in [("version", f"{name} v{info['version']}"), ("what", _describe(info)),
                           ("erased", ", ".join(info["erased"]) or "-"),
                           ("requests", ", ".join(info["request_ids"]) or "-"),
                           ("aliases", ", ".join(info["aliases"]) or "-"), ("gate", info["gate"] or "-"),
                           ("stored", f"{info['stored_bytes']:,d} bytes{fraction}"),
                           ("unet", f"{info['unet_bytes']:,d} bytes"), ("source", info["source"]),
                           ("run", info["run_id"]), ("base sha256", info["base_sha256"]),
                           ("delta sha256", info["delta_sha256"] or "-")]:
            typer.echo(f"{key:<13} {value}")

    @app.command()
    @one_line_errors
    def lineage(name: str = NAME, version: int = VERSION, as_json: bool = AS_JSON) -> None:
        """The chain from VERSION back to its base, and what each step erased."""
        from registry.versions import lineage as version_lineage

        chain = version_lineage(open_store(), name, version)
        if as_json:
            return _echo_json(chain)
        for r in chain:
            typer.echo(f"v{r['version']:<4} {_describe(r)}")

    @app.command()
    @one_line_errors
    def history(name: str = NAME, as_json: bool = AS_JSON) -> None:
        """Every alias move: time, actor, reason, from -> to."""
        from registry.aliases import history as alias_history

        events = alias_history(open_store(), name)
        if as_json:
            return _echo_json(events)
        for e in events:
            typer.echo(f"{e['time']}  {e['alias']:<10} {e['action']:<8} {_v(e['from'])} -> {_v(e['to'])}  "
                       f"by {e['actor']}: {e['reason']}")

    @app.command("promote")
    @one_line_errors
    def promote_cmd(name: str = NAME, version: int = VERSION, reason: str = REASON, actor: Optional[str] = ACTOR,
                    alias: Alias = typer.Option(Alias.production, help="the alias to move"),
                    force: bool = typer.Option(False, "--force", help="promote a version that failed its gate"),
                    as_json: bool = AS_JSON) -> None:
        """Point an alias at VERSION, after checking its stored files (and, for production, its gate); the
        requests it serves become promoted with it."""
        event = promote(name, version, reason, actor, alias=alias.value, force=force)
        if as_json:
            return _echo_json(event)
        typer.echo(f"{name} {alias.value}: {_v(event['from'])} -> {_v(event['to'])}" if event["changed"]
                   else f"{name} {alias.value} is already v{version}")

    @app.command("rollback")
    @one_line_errors
    def rollback_cmd(name: str = NAME, reason: str = REASON,
                     to: Optional[int] = typer.Option(None, help="version (default: the previous production)"),
                     actor: Optional[str] = ACTOR, as_json: bool = AS_JSON) -> None:
        """Move production back (by default to the previous production version)."""
        event = rollback(name, reason, actor, to=to)
        if as_json:
            return _echo_json(event)
        typer.echo(f"{name} production: {_v(event['from'])} -> {_v(event['to'])}")

    return app


def base_app() -> typer.Typer:
    """The `base` commands: register a base model."""
    app = typer.Typer(no_args_is_help=True, add_completion=False, help="Base models.")

    @app.command("import")
    @one_line_errors
    def base_import(path: Path = typer.Argument(..., help="a diffusers Stable Diffusion folder"),
                    name: str = typer.Option(..., help="registered model name, e.g. toy-sd"),
                    as_json: bool = AS_JSON) -> None:
        """Register a diffusers Stable Diffusion folder as version 1 of NAME."""
        from registry.versions import import_base

        info = import_base(open_store(), path, name)
        if as_json:
            return _echo_json(info)
        typer.echo(f"registered {name} v{info['version']}: {info['stored_bytes']:,d} bytes, "
                   f"unet {info['unet_bytes']:,d} bytes")

    return app
