"""Work pool, global concurrency limit and deployments on the Prefect server, created idempotently.

Deployments use module entrypoints (flows.takedown:takedown, ...): a worker on any machine that has this
package installed and reaches the same Prefect, MLflow and S3 servers can run them; that is all scale-out takes.
"""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectAlreadyExists

WORK_POOL = "esd"
GPU_LIMIT = "gpu"


def prefect_api(url: str):
    """Talk to the Prefect server at URL, whatever this process's Prefect settings were at import."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: url})


def ensure_pool_and_limit(pool: str = WORK_POOL, gpu_slots: int = 1) -> None:
    with get_client(sync_client=True) as client:
        try:
            from prefect.workers.process import ProcessWorker

            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=gpu_slots))
        except ObjectAlreadyExists:
            pass


def deploy_all(retrain_cron: str, retrain_model: str, pool: str = WORK_POOL) -> list[str]:
    """Create or update every deployment; retrain runs on the cron schedule and on demand."""
    from flows.operations import promote, rollback, withdraw
    from flows.retrain import retrain
    from flows.takedown import takedown

    ensure_pool_and_limit(pool)
    ids = []
    common = dict(work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH, build=False, push=False,
                  print_next_steps=False, ignore_warnings=True)
    for fl, extra in [(takedown, {}), (promote, {}), (rollback, {}), (withdraw, {}),
                      (retrain, {"cron": retrain_cron, "parameters": {"model": retrain_model}})]:
        ids.append(str(fl.deploy(name=fl.name, **common, **extra)))
    return ids
