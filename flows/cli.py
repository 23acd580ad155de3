"""`esd`: the platform's command line. Engine commands (esd.cli), the stack, the registry, requests and demo.

Errors are one line on stderr with exit status 1; nothing is filed or moved when input is refused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from esd.cli import app, errors_as_one_line, fail
from infra import stack
from infra.cli import stack_app
from infra.settings import Settings
from registry.cli import AFTER_PROMOTE, base_app, model_app

console = Console()
# Prefect reads its API address from the environment: set it before any client exists, so no command ever
# falls back to a temporary server of its own.
for _k, _v in Settings().prefect_env().items():
    os.environ.setdefault(_k, _v)
request_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Takedown requests.")
app.add_typer(stack_app, name="stack")
app.add_typer(model_app, name="model")
app.add_typer(base_app, name="base")
app.add_typer(request_app, name="request")

DEMO_CONCEPT = "Vela Moreau"


def _prefect_env() -> Settings:
    s = Settings()
    os.environ.update(s.prefect_env())
    return s


def _deploy(s: Settings) -> None:
    from flows.deploy import deploy_all, prefect_api

    with prefect_api(s.prefect_api):
        deploy_all(s.retrain_cron, s.retrain_model, s.work_pool)


stack.POST_UP.append(_deploy)


def _requests_follow(name: str, version: int) -> None:
    from flows.ops import requests_follow

    requests_follow(name, version)


AFTER_PROMOTE.append(_requests_follow)


def _platform_errors() -> tuple[type[BaseException], ...]:
    from flows.ops import OperationError
    from flows.requests import RequestError
    from registry.cli import _registry_errors

    return (RequestError, OperationError, stack.StackError) + _registry_errors()


platform_errors = errors_as_one_line(_platform_errors)


def _require_stack(s: Settings) -> None:
    down = [r.name for r in stack.status(s) if not r.up]
    if down:
        raise stack.StackError(f"not running: {', '.join(down)}; start them with `esd stack up`")


# --- base -----------------------------------------------------------------------------------------------------

@base_app.command("build-toy")
@platform_errors
def base_build_toy(name: str = "toy-sd", rebuild: bool = typer.Option(False, help="train from scratch first")):
    """Register the toy base as version 1 of NAME (and make it production), reusing the committed build."""
    from esd.toy import BASE_DIR

    folder = BASE_DIR
    if rebuild:
        from esd.toy.build import build

        out = Settings().home / "toy"
        build(out, log=console.print)
        folder = out / "base"
    info = ensure_base(name, folder)
    console.print(f"{name}: base version {info['version']} ({'registered now' if info['new'] else 'already registered'})")


def ensure_base(name: str, folder: Path) -> dict:
    """Register FOLDER as version 1 of NAME unless NAME exists; point production at it if nothing is there."""
    from registry import aliases
    from registry.store import RegistryError
    from registry.versions import base_version, import_base

    s = Settings()
    _require_stack(s)
    store = s.store()
    try:
        version, new = int(base_version(store, name).version), False
    except RegistryError:
        version, new = int(import_base(store, folder, name)["version"]), True
    if "production" not in (store.mlflow().get_registered_model(name).aliases or {}):
        aliases.promote(store, name, version, "base line registered", os.environ.get("ESD_ACTOR") or "esd-platform")
    return {"version": version, "new": new}


# --- requests -------------------------------------------------------------------------------------------------

@request_app.command("submit")
@platform_errors
def request_submit(concept: str, kind: str = typer.Option("style", help="style | object | nudity | custom"),
                   model: str = typer.Option("toy-sd", help="registered base line"),
                   requester: str = typer.Option("", help="a reference such as a ticket id (no e-mail addresses)"),
                   method: Optional[str] = typer.Option(None, help="default by kind: style esd-x, others esd-u"),
                   request_id: Optional[str] = typer.Option(None, help="caller's id (e.g. a ticket's); idempotency key"),
                   wait: bool = typer.Option(False, "--wait", help="follow the run until it ends"),
                   as_json: bool = typer.Option(False, "--json")):
    """File a takedown request and start its Prefect run (once per request id)."""
    result = submit(concept, kind, model, requester, method, request_id)
    if wait:
        follow(result["flow_run_id"])
    req = show_request(result["request_id"])
    if as_json:
        typer.echo(json.dumps(req))
    else:
        _print_request(req)


def submit(concept: str, kind: str, model: str, requester: str = "", method: str | None = None,
           request_id: str | None = None) -> dict:
    """Validate, file the record, start the takedown deployment with the request id as idempotency key."""
    from prefect.deployments import run_deployment

    from flows import ops
    from flows.deploy import prefect_api
    from flows.requests import Request, RequestError
    from registry.store import RegistryError
    from registry.versions import base_version

    req = Request(concept=concept, kind=kind, model=model, requester=requester or "", method=method)
    if request_id is not None:
        req.request_id = request_id
    req.validate()
    s = _prefect_env()
    _require_stack(s)
    try:
        base_version(s.store(), model)
    except RegistryError:
        raise RequestError(f"unknown base model {model!r}; register it first (esd base import / build-toy)") from None
    reqs = ops.requests()
    record, _ = reqs.file(req)
    if record.concept != req.concept or record.model != req.model:
        raise RequestError(f"request id {req.request_id} is already used by another request ({record.concept!r})")
    try:
        with prefect_api(s.prefect_api):
            run = run_deployment("takedown/takedown", parameters={"request_id": record.request_id},
                                 idempotency_key=record.request_id, tags=[f"request:{record.request_id}"], timeout=0,
                                 as_subflow=False)
    except Exception as exc:
        reqs.update(record.request_id, "failed", reason=f"could not start the run: {exc}"[:500])
        raise
    if record.flow_run_id != str(run.id):
        reqs.update(record.request_id, flow_run_id=str(run.id))
    return {"request_id": record.request_id, "flow_run_id": str(run.id)}


def follow(flow_run_id: str, poll: float = 2.0) -> str:
    """Show the run's task states and latest log line until it ends; returns the final state name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    from flows.deploy import prefect_api

    seen: dict[str, str] = {}
    with prefect_api(Settings().prefect_api), get_client(sync_client=True) as client, \
            console.status("waiting for a worker") as status:
        while True:
            fr = client.read_flow_run(flow_run_id)
            for tr in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id]))):
                state = tr.state.name if tr.state else "?"
                if seen.get(tr.name) != state:
                    seen[tr.name] = state
                    console.print(f"  {tr.name}: {state}")
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])), limit=1,
                                    sort=LogSort.TIMESTAMP_DESC)
            status.update(f"{fr.state.name if fr.state else 'pending'}: {logs[0].message[:100] if logs else ''}")
            if fr.state and fr.state.is_final():
                return fr.state.name
            time.sleep(poll)


def show_request(request_id: str) -> dict:
    from flows import ops

    return vars(ops.requests().require(request_id))


def _print_request(r: dict) -> None:
    console.print(f"request {r['request_id']}: {r['kind']} {r['concept']!r} on {r['model']} ({r['method']})")
    console.print(f"  status {r['status']}, model version {r.get('model_version') or '-'}, gate {r.get('gate') or '-'}, "
                  f"flow run {r.get('flow_run_id') or '-'}")
    if r.get("reason"):
        console.print(f"  reason: {r['reason']}")


@request_app.command("list")
@platform_errors
def request_list(status: Optional[str] = None, as_json: bool = typer.Option(False, "--json")):
    """Requests, newest first (from their MLflow records)."""
    from flows import ops

    _require_stack(Settings())
    rows = [vars(r) for r in ops.requests().list(status)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        console.print(f"{r['request_id']}  {r['status']:<9} {r['kind']:<7} {r['concept']!r} -> "
                      f"{r['model']}/{r.get('model_version') or '-'}")


@request_app.command("show")
@platform_errors
def request_show(request_id: str, as_json: bool = typer.Option(False, "--json")):
    """One request: status, model version, gate, Prefect flow run."""
    _require_stack(Settings())
    r = show_request(request_id)
    if as_json:
        typer.echo(json.dumps(r))
    else:
        _print_request(r)


@request_app.command("withdraw")
@platform_errors
def request_withdraw(request_id: str, reason: str = typer.Option(..., help="why (recorded)"),
                     actor: Optional[str] = None):
    """Withdraw or reject a request: it is excluded from the next retrain."""
    from flows import ops

    _require_stack(Settings())
    r = ops.withdraw(request_id, reason, actor or ops.actor())
    console.print(f"request {request_id}: {r['status']}")


# --- operations -----------------------------------------------------------------------------------------------

@app.command("retrain")
@platform_errors
def retrain_cmd(now: bool = typer.Option(False, "--now", help="run the retrain deployment now"),
                model: Optional[str] = None, wait: bool = typer.Option(False, "--wait")):
    """Consolidate every active request into one erasure of the base (also runs on the nightly schedule)."""
    from prefect.deployments import run_deployment

    if not now:
        fail("retrain runs on its schedule; use --now to run it now")
    s = _prefect_env()
    _require_stack(s)
    from flows.deploy import prefect_api

    with prefect_api(s.prefect_api):
        run = run_deployment("retrain/retrain", parameters={"model": model or s.retrain_model}, timeout=0,
                             as_subflow=False)
    console.print(f"retrain flow run {run.id}")
    if wait:
        console.print(f"finished: {follow(str(run.id))}")


@app.command("generate")
@platform_errors
def generate_cmd(prompt: str, model: str = typer.Option("toy-sd@production", help="NAME@ALIAS or NAME/VERSION"),
                 out: Path = typer.Option(Path("out.png"), "-o", "--out"), seed: int = 0, steps: int = 25,
                 guidance: float = 5.0):
    """Generate one image from a registered version."""
    from PIL import Image

    from registry.load import generate, load

    s = Settings()
    _require_stack(s)
    pipe = load(s.store(), model)
    img = generate(pipe, [prompt], seed=seed, num_inference_steps=steps, guidance_scale=guidance)[0]
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(out)
    console.print(f"{model}: {out}")


@app.command("demo")
@platform_errors
def demo(concept: str = DEMO_CONCEPT):
    """Start the stack, register the toy base, take down an artist's style, and show the result."""
    from esd.toy import BASE_DIR
    from registry.versions import show

    s = _prefect_env()
    t0 = time.time()
    console.print("starting the stack (SeaweedFS, MLflow, Prefect server and worker)")
    stack.up(s)
    base = ensure_base("toy-sd", BASE_DIR)
    console.print(f"toy-sd base: version {base['version']}")
    result = submit(concept, "style", "toy-sd", requester="demo")
    console.print(f"request {result['request_id']}: takedown of {concept!r}, flow run {result['flow_run_id']}")
    state = follow(result["flow_run_id"])
    r = show_request(result["request_id"])
    _print_request(r)
    if state != "Completed" or not r.get("model_version"):
        fail(f"the takedown run ended {state}: {r.get('reason') or 'see the Prefect UI'}")
    version = show(s.store(), "toy-sd", r["model_version"])
    client = s.store().mlflow()
    metrics = client.get_run(r["run_id"]).data.metrics
    console.print(f"new version: toy-sd/{r['model_version']} ({version['stored_bytes']:,} bytes stored, "
                  f"{version['stored_fraction_of_unet']:.2%} of the full UNet), aliases {version['aliases']}")
    for k in sorted(metrics):
        console.print(f"  {k:<28} {metrics[k]:.3f}")
    grids = sorted((s.home / "reports" / f"takedown-{r['request_id']}").glob("*.png"))
    for g in grids:
        console.print(f"grid: {g.resolve()}")
    experiment = client.get_run(r["run_id"]).info.experiment_id
    console.print(f"MLflow UI:  {s.tracking_uri}/#/experiments/{experiment}/runs/{r['run_id']}")
    console.print(f"Prefect UI: {s.prefect_api.removesuffix('/api')}/runs/flow-run/{result['flow_run_id']}")
    console.print(f"takedown finished in {time.time() - t0:.0f}s")
