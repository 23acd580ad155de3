"""`esd`: the command line, assembled here by calling each layer's pieces (engine, platform, registry, stack);
nothing is wired by an import's side effect. Errors are one line on stderr with exit status 1; nothing is filed
or moved when input is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from typer.exceptions import TyperException

from flows.platform import Platform
from infra.errors import errors_as_one_line, fail
from infra import users
from infra.settings import Settings, settings_error

# Lines are not broken at the terminal's width: ids and URLs stay whole, to copy.
console = Console(soft_wrap=True)
DEMO_CONCEPT = "Vela Moreau"
ENGINE, PLATFORM, REGISTRY, STACK = "Engine", "Platform", "Registry", "Stack"
AS_JSON = typer.Option(False, "--json", help="print JSON")


class Kind(str, Enum):
    style = "style"
    object = "object"
    nudity = "nudity"
    custom = "custom"


class Status(str, Enum):
    received = "received"
    running = "running"
    candidate = "candidate"
    promoted = "promoted"
    held = "held"
    failed = "failed"
    withdrawn = "withdrawn"


def platform_errors() -> tuple[type[BaseException], ...]:
    from esd.erase_defaults import EraseDefaultsError
    from flows.gate import GateError
    from flows.promotion import ProductionMoved
    from flows.requests import RequestError
    from infra.errors import ReasonRequired
    from infra.stack import StackError
    from registry.cli import registry_errors

    return (RequestError, StackError, ReasonRequired, GateError, EraseDefaultsError, ProductionMoved,
            users.AuthError) + registry_errors()


one_line_errors = errors_as_one_line(platform_errors)


def running_platform(needs: str = "registry") -> Platform:
    """The platform of the current settings, once the services it needs answer: "registry" (S3 and MLflow) for
    records, versions and aliases; "all" (Prefect too) to start runs."""
    from infra import stack

    s = Settings()
    down = [r.name for r in stack.status(s, None if needs == "all" else stack.REGISTRY) if not r.up]
    if down:
        raise stack.StackError(f"not running: {', '.join(down)}; start them with `esd stack up`")
    return Platform(s)


# --- base -----------------------------------------------------------------------------------------------------

@one_line_errors
def base_build_toy(name: str = typer.Option("toy-sd", help="registered model name"),
                   rebuild: bool = typer.Option(False, help="train the toy from scratch first (about an hour)")):
    """Register the toy base as version 1 of NAME (and make it production), reusing the committed build."""
    from esd.toy import BASE_DIR

    folder = BASE_DIR
    if rebuild:
        from esd.toy.build import build

        out = Settings().home / "toy"
        build(out, log=console.print)
        folder = out / "base"
    info = ensure_base(running_platform(), name, folder)
    console.print(f"{name}: base version {info['version']} ({'registered now' if info['new'] else 'already registered'})")


def ensure_base(platform: Platform, name: str, folder: Path) -> dict:
    """Register FOLDER as version 1 of NAME unless NAME exists; point production at it if nothing is there."""
    from flows import promotion
    from registry.aliases import current
    from registry.store import RegistryError
    from registry.versions import base_version, import_base

    store = platform.store
    try:
        version, new = int(base_version(store, name).version), False
    except RegistryError:
        version, new = int(import_base(store, folder, name)["version"]), True
    if current(store, name) is None:
        promotion.promote(platform, name, version, "base line registered", "esd-platform")
    return {"version": version, "new": new}


# --- requests -------------------------------------------------------------------------------------------------

def request_app() -> typer.Typer:
    app = typer.Typer(no_args_is_help=True, add_completion=False, help="Takedown requests.")
    app.command("submit")(request_submit)
    app.command("list")(request_list)
    app.command("show")(request_show)
    app.command("withdraw")(request_withdraw)
    app.command("hold")(request_hold)
    app.command("retry")(request_retry)
    app.command("reap")(request_reap)
    return app


@one_line_errors
def request_submit(concept: str = typer.Argument(..., help="the style, object or subject to erase"),
                   kind: Kind = typer.Option(Kind.style, help="what the concept is; decides the default method and gate"),
                   model: str = typer.Option("toy-sd", help="registered base line"),
                   requester: str = typer.Option("", help="a reference such as a ticket id (no e-mail addresses)"),
                   method: Optional[str] = typer.Option(None, help="erasure method (`esd methods`; default: the "
                                                                  "kind's default)"),
                   request_id: Optional[str] = typer.Option(None, help="caller's id (e.g. a ticket's); idempotency key"),
                   wait: bool = typer.Option(False, "--wait", help="follow the run until it ends"),
                   as_json: bool = AS_JSON):
    """File a takedown request and start its Prefect run (once per request id)."""
    result = submit(concept, kind.value, model, requester, method, request_id)
    _report(result["request_id"], result["flow_run_id"] if wait else None, as_json)


def submit(concept: str, kind: str, model: str, requester: str = "", method: str | None = None,
           request_id: str | None = None, platform: Platform | None = None) -> dict:
    """Validate, file the record, start the takedown deployment with the request id as idempotency key."""
    from flows.requests import Request, RequestError
    from registry.store import RegistryError
    from registry.versions import base_version

    req = Request(concept=concept, kind=kind, model=model, requester=requester or "", method=method)
    if request_id is not None:
        req.request_id = request_id
    req.validate()
    p = platform or running_platform("all")
    try:
        base_version(p.store, model)
    except RegistryError:
        raise RequestError(f"unknown base model {model!r}; register it first (esd base import / build-toy)") from None
    record, _ = p.requests.file(req)
    if record.concept != req.concept or record.model != req.model:
        raise RequestError(f"request id {req.request_id} is already used by another request ({record.concept!r})")
    return start_run(p, record)


def start_run(p: Platform, record) -> dict:
    """Start the takedown deployment for a filed record; its request id (and attempt) is the idempotency key, so
    however often this is called, one attempt has one flow run."""
    from prefect.deployments import run_deployment

    from flows.deploy import prefect_api

    key = record.request_id if int(record.attempt or 1) == 1 else f"{record.request_id}#{record.attempt}"
    try:
        with prefect_api(p.settings.prefect_api):
            run = run_deployment("takedown/takedown", parameters={"request_id": record.request_id},
                                 idempotency_key=key, tags=[f"request:{record.request_id}"], timeout=0,
                                 as_subflow=False)
    except Exception as exc:
        p.requests.fail([record.request_id], f"could not start the run: {exc}")
        raise
    if record.flow_run_id != str(run.id):
        p.requests.update(record.request_id, flow_run_id=str(run.id))
    return {"request_id": record.request_id, "flow_run_id": str(run.id)}


def follow(flow_run_id: str, poll: float = 2.0, quiet: bool = False) -> str:
    """Show the run's task states and latest log line until it ends (on stderr, so stdout stays for --json);
    returns the final state name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    from flows.deploy import prefect_api

    out = Console(stderr=True, quiet=quiet, soft_wrap=True)
    seen: dict[str, str] = {}
    with prefect_api(Settings().prefect_api), get_client(sync_client=True) as client, \
            out.status("waiting for a worker") as status:
        while True:
            fr = client.read_flow_run(flow_run_id)
            for tr in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id]))):
                state = tr.state.name if tr.state else "?"
                if seen.get(tr.name) != state:
                    seen[tr.name] = state
                    out.print(f"  {tr.name}: {state}")
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])), limit=1,
                                    sort=LogSort.TIMESTAMP_DESC)
            status.update(f"{fr.state.name if fr.state else 'pending'}: {logs[0].message[:100] if logs else ''}")
            if fr.state and fr.state.is_final():
                return fr.state.name
            time.sleep(poll)


def show_request(request_id: str) -> dict:
    return vars(running_platform().requests.require(request_id))


def _report(request_id: str, follow_run: str | None, as_json: bool) -> None:
    """Follow the run (when given) until it ends, then print the request, as JSON or as text."""
    if follow_run:
        follow(follow_run, quiet=as_json)
    r = show_request(request_id)
    if as_json:
        typer.echo(json.dumps(r))
    else:
        _print_request(r)


def _print_request(r: dict) -> None:
    console.print(f"request {r['request_id']}: {r['kind']} {r['concept']!r} on {r['model']} ({r['method']})")
    console.print(f"  status {r['status']}, model version {r.get('model_version') or '-'}, gate {r.get('gate') or '-'}, "
                  f"flow run {r.get('flow_run_id') or '-'}")
    if r.get("reason"):
        console.print(f"  reason: {r['reason']}")


@one_line_errors
def request_list(status: Optional[Status] = typer.Option(None, help="only requests with this status"),
                 as_json: bool = AS_JSON):
    """Requests, newest first (from their MLflow records)."""
    rows = [vars(r) for r in running_platform().requests.list(status.value if status else None)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        console.print(f"{r['request_id']}  {r['status']:<9} {r['kind']:<7} {r['concept']!r} -> "
                      f"{r['model']}/{r.get('model_version') or '-'}")


@one_line_errors
def request_show(request_id: str = typer.Argument(..., help="the request's id"), as_json: bool = AS_JSON):
    """One request: status, model version, gate, Prefect flow run."""
    _report(request_id, None, as_json)


@one_line_errors
def request_retry(request_id: str = typer.Argument(..., help="the failed request's id"),
                  wait: bool = typer.Option(False, "--wait", help="follow the run until it ends"),
                  as_json: bool = AS_JSON):
    """File a failed request again and start a new run for it."""
    p = running_platform("all")
    record = p.requests.retry(request_id)
    result = start_run(p, record)
    _report(request_id, result["flow_run_id"] if wait else None, as_json)


@one_line_errors
def request_reap(as_json: bool = AS_JSON):
    """Fail the requests whose flow run is dead (also runs every ESD_REAP_MINUTES on the worker)."""
    from flows.deploy import prefect_api
    from flows.reaper import reap_dead

    p = running_platform("all")
    with prefect_api(p.settings.prefect_api):
        dead = reap_dead(p)
    if as_json:
        typer.echo(json.dumps([request_id for request_id, _ in dead]))
        return
    for request_id, why in dead:
        console.print(f"request {request_id}: failed ({why})")
    console.print(f"failed {len(dead)} request(s) whose run was dead")


@one_line_errors
def request_withdraw(request_id: str = typer.Argument(..., help="the request's id"),
                     reason: str = typer.Option(..., help="why (recorded)")):
    """Withdraw or reject a request: it is excluded from the next retrain (an operator's act: ESD_TOKEN of an
    operator, or the administrator)."""
    p = running_platform()
    who = users.command_line_user(p.settings, "operator", what="withdrawing a request")
    r = p.requests.withdraw(request_id, reason, who.actor)
    console.print(f"request {request_id}: {r.status}")


@one_line_errors
def request_hold(request_id: str = typer.Argument(..., help="the request's id"),
                 reason: str = typer.Option(..., help="why (recorded)")):
    """Hold a candidate or promoted request for review (an operator's act)."""
    p = running_platform()
    who = users.command_line_user(p.settings, "operator", what="holding a request")
    r = p.requests.hold(request_id, reason, who.actor)
    console.print(f"request {request_id}: {r.status}")


# --- promotion (the `model promote` and `model rollback` commands) --------------------------------------------

@contextlib.contextmanager
def lineage_held(p: Platform, model: str):
    """The model's lineage slot, as the flows take it, where this stack runs Prefect (a registry-only set-up runs no
    flows that could interleave); waits for a running takedown or retrain on the model, at most ten minutes."""
    from infra import stack

    # a local Prefect counts only when this stack started it: another one answering on its port is not this stack's
    if not all(r.up and (r.pid is not None or not r.managed) for r in stack.status(p.settings, ("prefect-server",))):
        yield
        return
    from flows.deploy import lineage_slot, prefect_api

    with prefect_api(p.settings.prefect_api), contextlib.ExitStack() as held:
        with Console(stderr=True).status(f"waiting for any takedown or retrain on {model} to finish"):
            held.enter_context(lineage_slot(model, timeout_seconds=600))
        yield


def promote(name: str, version: int, reason: str, actor: str | None = None, alias: str = "production",
            force: bool = False, platform: Platform | None = None) -> dict:
    """Promote as an operator: the command line's user (ESD_TOKEN, else the administrator), or ACTOR, a name the
    HTTP API has authenticated."""
    from flows import promotion

    p = platform or running_platform()
    who = actor or users.command_line_user(p.settings, "operator", what="promote").actor
    with lineage_held(p, name):
        return promotion.promote(p, name, version, reason, who, alias=alias, force=force)


def rollback(name: str, reason: str, actor: str | None = None, to: int | None = None,
             platform: Platform | None = None) -> dict:
    from flows import promotion

    p = platform or running_platform()
    who = actor or users.command_line_user(p.settings, "operator", what="rollback").actor
    with lineage_held(p, name):
        return promotion.rollback(p, name, reason, who, to)


# --- operations -----------------------------------------------------------------------------------------------

@one_line_errors
def retrain_cmd(now: bool = typer.Option(False, "--now", help="run the retrain deployment now"),
                model: Optional[str] = typer.Option(None, help="registered base line (default: ESD_RETRAIN_MODEL)"),
                wait: bool = typer.Option(False, "--wait", help="follow the run until it ends")):
    """Consolidate every active request into one erasure of the base (also runs on the nightly schedule)."""
    from prefect.deployments import run_deployment

    from flows.deploy import prefect_api

    if not now:
        fail("retrain runs on its schedule; use --now to run it now")
    p = running_platform("all")
    with prefect_api(p.settings.prefect_api):
        run = run_deployment("retrain/retrain", parameters={"model": model or p.settings.retrain_model}, timeout=0,
                             as_subflow=False)
    console.print(f"retrain flow run {run.id}")
    if wait:
        console.print(f"finished: {follow(str(run.id))}")


@one_line_errors
def generate_cmd(prompt: str = typer.Argument(..., help="the text prompt"),
                 model: str = typer.Option("toy-sd@production", help="NAME@ALIAS or NAME/VERSION"),
                 out: Path = typer.Option(Path("out.png"), "-o", "--out", help="PNG file to write"),
                 seed: int = typer.Option(0, help="seed of the starting noise"),
                 steps: int = typer.Option(25, min=1, max=1000, help="DDIM steps"),
                 guidance: float = typer.Option(5.0, help="classifier-free guidance scale")):
    """Generate one image from a registered version."""
    from PIL import Image

    from esd import sample
    from registry.load import load

    pipe = load(running_platform().store, model)
    img = sample.to_uint8(sample.generate(pipe, [prompt], [seed], steps=steps, guidance=guidance))[0]
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(out)
    console.print(f"{model}: {out}")


@one_line_errors
def demo(concept: str = typer.Option(DEMO_CONCEPT, help="the artist whose style to take down")):
    """Start the stack, register the toy base, take down an artist's style, and show the result."""
    from esd.toy import BASE_DIR
    from flows import deploy
    from registry.versions import show

    s = Settings()
    t0 = time.time()
    console.print("starting the stack (SeaweedFS, MLflow, Prefect server and worker)")
    deploy.up(s)
    p = Platform(s)
    base = ensure_base(p, "toy-sd", BASE_DIR)
    console.print(f"toy-sd base: version {base['version']}")
    result = submit(concept, "style", "toy-sd", requester="demo")
    console.print(f"request {result['request_id']}: takedown of {concept!r}, flow run {result['flow_run_id']}")
    state = follow(result["flow_run_id"])
    r = show_request(result["request_id"])
    _print_request(r)
    if state != "Completed" or not r.get("model_version"):
        fail(f"the takedown run ended {state}: {r.get('reason') or 'see the Prefect UI'}")
    version = show(p.store, "toy-sd", r["model_version"])
    client = p.store.mlflow()
    metrics = client.get_run(r["run_id"]).data.metrics
    console.print(f"new version: toy-sd/{r['model_version']} ({version['stored_bytes']:,} bytes stored, "
                  f"{version['stored_fraction_of_unet']:.2%} of the full UNet), aliases {version['aliases']}")
    for k in sorted(metrics):
        console.print(f"  {k:<28} {metrics[k]:.3f}")
    for g in sorted((s.home / "reports" / f"takedown-{r['request_id']}").glob("*.png")):
        console.print(f"grid: {g.resolve()}", soft_wrap=True)
    experiment = client.get_run(r["run_id"]).info.experiment_id
    console.print(f"MLflow UI:  {s.tracking_uri}/#/experiments/{experiment}/runs/{r['run_id']}", soft_wrap=True)
    console.print(f"Prefect UI: {s.prefect_api.removesuffix('/api')}/runs/flow-run/{result['flow_run_id']}",
                  soft_wrap=True)
    if s.api:
        pages = f"http://{s.host}:{s.api_port}"
        console.print(f"Opt-out:    {pages}/opt-out", soft_wrap=True)
        console.print(f"Review:     {pages}/review/requests/{r['request_id']} (sign in with an operator's "
                      f"credential: esd user add NAME --role operator)", soft_wrap=True)
    if s.local_mlflow or s.local_prefect:
        console.print(f"sign-in:    MLflow user {s.mlflow_username}, Prefect's auth string: in "
                      f"{(s.home / 'credentials.json').resolve()} (mlflow_admin_password, prefect_auth_string)",
                      soft_wrap=True)
    console.print(f"takedown finished in {time.time() - t0:.0f}s")


# --- the assembly ---------------------------------------------------------------------------------------------

def build_app() -> typer.Typer:
    """The root `esd` command: engine, platform, registry and stack commands, grouped in its help."""
    from esd import cli as engine
    from flows import deploy
    from infra.cli import stack_app, user_app
    from registry.cli import base_app, model_app

    app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="Takedown requests as tracked erasure runs: erase a concept from a Stable Diffusion model, "
                           "evaluate, register, gate, promote or roll back.")
    app.command("erase", rich_help_panel=ENGINE)(engine.erase_cmd)
    app.command("methods", rich_help_panel=ENGINE)(engine.methods_cmd)
    app.add_typer(engine.toy_app, name="toy", rich_help_panel=ENGINE)
    app.add_typer(engine.bench_app, name="bench", rich_help_panel=ENGINE)
    app.command("demo", rich_help_panel=PLATFORM)(demo)
    app.command("api", rich_help_panel=PLATFORM)(api)
    app.add_typer(request_app(), name="request", rich_help_panel=PLATFORM)
    app.command("retrain", rich_help_panel=PLATFORM)(retrain_cmd)
    app.command("generate", rich_help_panel=PLATFORM)(generate_cmd)
    app.add_typer(model_app(promote=promote, rollback=rollback), name="model", rich_help_panel=REGISTRY)
    base = base_app()
    base.command("build-toy")(base_build_toy)
    app.add_typer(base, name="base", rich_help_panel=REGISTRY)
    app.add_typer(stack_app(up=deploy.up, errors=platform_errors), name="stack", rich_help_panel=STACK)
    app.add_typer(user_app(), name="user", rich_help_panel=STACK)
    return app


def api(host: str = typer.Option(None, help="bind address (default: ESD_HOST, 127.0.0.1)"),
        port: int = typer.Option(None, help="port (default: ESD_API_PORT, 4212)")) -> None:
    """Serve the HTTP API and its pages (OpenAPI at /v1/openapi.json).

    \b
    POST   /v1/requests                   file a request (Idempotency-Key)
    GET    /v1/requests/{id}              its status (status token, submitter)
    GET    /v1/requests                   list (submitter: own; operator: all)
    POST   /v1/requests/{id}/promote      operator, reason (force: past the gate)
    POST   /v1/requests/{id}/hold         operator, reason
    POST   /v1/requests/{id}/withdraw     operator, reason
    GET    /v1/models/{name}              operator, reader: versions, history
    POST   /v1/models/{name}/rollback     operator, reason
    POST   /v1/webhooks                   follow status changes (signed)
    DELETE /v1/webhooks/{id}              operator
    GET    /v1/health, /v1/openapi.json   liveness, the OpenAPI document
    GET    /opt-out, /review              opt-out page, review page
    """
    import uvicorn

    from flows.api.app import create_app

    s = Settings()
    uvicorn.run(create_app(s), host=host or s.host, port=port or s.api_port, log_level="warning")


def main() -> None:
    """The `esd` console script: the quiet environment, Prefect pointed at this stack's server, then the app."""
    from infra.env import quiet

    quiet()
    # Prefect reads its API address, home and auth from the environment, MLflow its credentials: set them before
    # any client exists, so no command ever falls back to a temporary server of its own.
    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"error: {settings_error(exc)}", err=True)
        sys.exit(1)
    for k, v in settings.client_env().items():
        os.environ.setdefault(k, v)
    sys.exit(invoke())


def invoke(args: list[str] | None = None) -> int:
    """Run the `esd` command line on ARGS (default: sys.argv); returns the exit code. Usage errors are one line."""
    command = typer.main.get_command(build_app())
    try:
        code = command.main(args=args, prog_name="esd", standalone_mode=False)
    except TyperException as exc:
        # A bad option or value is one line, as every other refused input: what, and where to look.
        ctx = getattr(exc, "ctx", None)
        message = exc.format_message().replace("Value error, ", "")
        typer.echo(f"error: {message} (see `{ctx.command_path if ctx else 'esd'} --help`)", err=True)
        code = 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        code = 1
    return code if isinstance(code, int) else 0
