"""Work pool, global concurrency limit and deployments on the Prefect server, created idempotently.

Deployments use module entrypoints (flows.takedown:takedown, ...): a worker on any machine that has this
package installed and reaches the same Prefect, MLflow and S3 servers can run them; that is all scale-out takes.
"""

from __future__ import annotations

from infra import stack
from infra.prefect_server import HEARTBEAT_S
from infra.settings import Settings

WORK_POOL = "esd"
# One erasure or evaluation at a time per slot: the global concurrency limit the heavy tasks share.
GPU_LIMIT = "gpu"


def prefect_api(url: str):
    """Talk to the Prefect server at URL, whatever this process's Prefect settings were at import."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: url})


# A slot's holder renews its lease while it runs; a holder killed outright frees the slot when the lease lapses
# (Prefect's shortest lease).
SLOT_LEASE_S = 60


def gpu_slot():
    """One erasure or evaluation per device at a time."""
    from prefect.concurrency.sync import concurrency

    return concurrency(GPU_LIMIT, occupy=1, lease_duration=SLOT_LEASE_S)


def lineage_slot(model: str, timeout_seconds: float | None = None):
    """One writer per model lineage: a takedown or retrain holds its model's slot from reading production to moving
    it, so runs on one model cannot interleave (each also refuses a production that moved; flows.promotion)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = f"model-{model}"
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass
    # A renewal that fails while the Prefect server restarts does not kill the run: production's compare-and-set
    # (flows.promotion) still refuses to promote over a parent that moved.
    return concurrency(name, occupy=1, strict=True, timeout_seconds=timeout_seconds, lease_duration=SLOT_LEASE_S,
                       raise_on_lease_renewal_failure=False)


# What a deployment or a flow run may set on the worker: nothing that chooses the command it runs or the environment
# it runs in (which holds the stack's keys).
LOCKED_VARIABLES = ("command", "env", "working_dir")


def locked_job_template(template: dict) -> dict:
    """The process worker's base job template without per-run command, environment or working directory: those
    variables are gone from its schema (extra ones refused) and from the job configuration."""
    template = {"job_configuration": dict(template["job_configuration"]), "variables": dict(template["variables"])}
    props = {k: v for k, v in template["variables"]["properties"].items() if k not in LOCKED_VARIABLES}
    template["variables"] = template["variables"] | {"properties": props, "additionalProperties": False}
    template["variables"]["required"] = [r for r in template["variables"].get("required", []) if r in props]
    for k in LOCKED_VARIABLES:
        template["job_configuration"].pop(k, None)
    return template


def ensure_pool_and_limit(pool: str = WORK_POOL, gpu_slots: int = 1) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    from prefect.client.schemas.actions import WorkPoolUpdate

    template = locked_job_template(ProcessWorker.get_default_base_job_template())
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        except ObjectAlreadyExists:
            client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=gpu_slots))
        except ObjectAlreadyExists:
            pass


ZOMBIE_AUTOMATION = "esd: crash silent flow runs"


def ensure_zombie_automation() -> None:
    """Prefect's recipe for runs whose process died on any host (a killed worker, a lost machine): no heartbeat
    for 3 x HEARTBEAT_S marks the run Crashed, and the reaper then fails its request."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return
    except ValueError:
        pass
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=3 * HEARTBEAT_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {3 * HEARTBEAT_S} s: its process is gone")],
    ).create()


def deploy_all(retrain_cron: str, retrain_model: str, pool: str = WORK_POOL, timeout_s: int = 6 * 3600,
               reap_minutes: int = 10) -> list[str]:
    """Create or update every deployment (quietly); retrain runs on the cron schedule and on demand, the reaper
    every REAP_MINUTES."""
    from prefect.deployments.runner import EntrypointType

    from flows.operator import promote, rollback, withdraw
    from flows.reaper import reap
    from flows.retrain import retrain
    from flows.takedown import takedown

    ensure_pool_and_limit(pool)
    ensure_zombie_automation()
    ids = []
    for fl, extra in [(takedown.with_options(timeout_seconds=timeout_s), {}), (promote, {}), (rollback, {}),
                      (withdraw, {}),
                      (retrain.with_options(timeout_seconds=timeout_s),
                       {"cron": retrain_cron, "parameters": {"model": retrain_model}}),
                      (reap, {"interval": reap_minutes * 60})]:
        dep = fl.to_deployment(name=fl.name, entrypoint_type=EntrypointType.MODULE_PATH, work_pool_name=pool, **extra)
        ids.append(str(dep.apply(work_pool_name=pool)))
    return ids


def up(settings: Settings) -> list[stack.ServiceStatus]:
    """The platform's `stack up`: the gate's and the operator's erase settings checked, every service answering, then
    the work pool and deployments in place."""
    from esd import erase_defaults
    from flows.gate import load_settings

    load_settings()
    erase_defaults.load()
    rows = stack.up(settings)
    with prefect_api(settings.prefect_api):
        deploy_all(settings.retrain_cron, settings.retrain_model, settings.work_pool, settings.flow_timeout_s,
                   settings.reap_minutes)
    return rows
