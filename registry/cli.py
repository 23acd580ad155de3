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

from esd import arch_names
from infra.errors import errors_as_one_line, fail

AS_JSON = typer.Option(False, "--json", help="print JSON")
REASON = typer.Option(..., help="why (recorded in the history)")
NAME = typer.Argument(..., help="registered model, e.g. toy-sd")
VERSION = typer.Argument(..., help="version number")


class Alias(str, Enum):
    production = "production"
    candidate = "candidate"


class Format(str, Enum):
    diffusers = "diffusers"
    single_file = "single-file"


Arch = arch_names.choices("Arch", arch_names.SINGLE_FILE)


def registry_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from mlflow.exceptions import MlflowException

    from esd.delta import DeltaError
    from esd.models import ModelError
    from esd.single_file import SingleFileError
    from infra.errors import ReasonRequired
    from registry.store import RegistryError

    return (MlflowException, RegistryError, ReasonRequired, DeltaError, ModelError, SingleFileError, BotoCoreError,
            ClientError, OSError)


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
    """The `model` commands. PROMOTE(name, version, reason, alias=, force=) and ROLLBACK(name, reason,
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
    def promote_cmd(name: str = NAME, version: int = VERSION, reason: str = REASON,
                    alias: Alias = typer.Option(Alias.production, help="the alias to move"),
                    force: bool = typer.Option(False, "--force", help="promote a version that failed its gate"),
                    as_json: bool = AS_JSON) -> None:
        """Point an alias at VERSION, after checking its stored files (and, for production, its gate); the
        requests it serves become promoted with it. Recorded under the operator ESD_TOKEN proves, else the
        administrator."""
        event = promote(name, version, reason, alias=alias.value, force=force)
        if as_json:
            return _echo_json(event)
        typer.echo(f"{name} {alias.value}: {_v(event['from'])} -> {_v(event['to'])}" if event["changed"]
                   else f"{name} {alias.value} is already v{version}")

    @app.command("rollback")
    @one_line_errors
    def rollback_cmd(name: str = NAME, reason: str = REASON,
                     to: Optional[int] = typer.Option(None, help="version (default: the previous production)"),
                     as_json: bool = AS_JSON) -> None:
        """Move production back (by default to the previous production version), as the operator ESD_TOKEN
        proves, else the administrator."""
        event = rollback(name, reason, to=to)
        if as_json:
            return _echo_json(event)
        typer.echo(f"{name} production: {_v(event['from'])} -> {_v(event['to'])}")

    @app.command("export")
    @one_line_errors
    def export_cmd(name: str = NAME, version: int = VERSION,
                   fmt: Format = typer.Option(..., "--format", help="a diffusers folder, or one .safetensors file in "
                                                                   "the original layout (A1111, ComfyUI)"),
                   out: Path = typer.Option(..., help="where to write it (a new path)"),
                   as_json: bool = AS_JSON) -> None:
        """Write VERSION (its base with its delta applied, every file checked against the registry) as a diffusers
        folder or as one safetensors file, and print its sha256 (for a folder: its UNet's, as the registry
        records bases)."""
        from registry.export import export_version

        info = export_version(open_store(), name, version, out, fmt.value)
        if as_json:
            return _echo_json(info)
        what = "unet sha256" if fmt is Format.diffusers else "sha256"
        unet = "" if fmt is Format.diffusers else f", unet sha256 {info['unet_sha256']}"
        typer.echo(f"exported {name} v{version} ({info['arch']}, {fmt.value}) to {info['path']}: {what} "
                   f"{info['sha256']}{unet}")

    @app.command("register")
    @one_line_errors
    def register_cmd(name: str = NAME,
                     delta: Path = typer.Argument(..., help="a delta folder written by `esd erase` against NAME's base"),
                     as_json: bool = AS_JSON) -> None:
        """Register an erasure made with `esd erase` as the next version of NAME (a candidate: not promoted, and
        its gate not evaluated; a takedown request evaluates and gates its own)."""
        from registry.versions import register_erased

        info = register_erased(open_store(), name, delta)
        if as_json:
            return _echo_json(info)
        typer.echo(f"registered {name} v{info['version']}: {info['method']} erasing {', '.join(info['concepts'])}, "
                   f"{info['stored_bytes']:,d} bytes")

    return app


def base_app() -> typer.Typer:
    """The `base` commands: register a base model."""
    app = typer.Typer(no_args_is_help=True, add_completion=False, help="Base models.")

    @app.command("import")
    @one_line_errors
    def base_import(path: Path = typer.Argument(..., help="a diffusers Stable Diffusion folder, or a single-file "
                                                          "checkpoint (.safetensors)"),
                    name: str = typer.Option(..., help="registered model name, e.g. toy-sd"),
                    arch: Optional[Arch] = typer.Option(None, help="the architecture of a single-file checkpoint; "
                                                                   "needed when the file carries no configs of its "
                                                                   "own (files of `esd model export` do)"),
                    as_json: bool = AS_JSON) -> None:
        """Register a diffusers Stable Diffusion folder as version 1 of NAME; a single .safetensors file is first
        converted into one by diffusers' own converter, offline."""
        from esd.single_file import as_folder, infer_arch, is_single_file
        from registry.versions import import_base, model_name

        model_name(name)
        store = open_store()
        converted = ""
        with as_folder(path, arch.value if arch else None) as folder:
            if not is_single_file(path):
                info = import_base(store, folder, name)
            else:
                found = infer_arch(folder)
                info = import_base(store, folder, name, source=path) | \
                    {"converted_from": {"file": str(path), "arch": found}}
                converted = f"converted from single file {path.name} ({found}), "
        if as_json:
            return _echo_json(info)
        typer.echo(f"registered {name} v{info['version']}: {converted}{info['stored_bytes']:,d} bytes, "
                   f"unet {info['unet_bytes']:,d} bytes, unet sha256 {info['base_sha256']}")

    return app
