"""Prefect tasks: small, typed steps composing esd + registry. They take and return ids, URIs, paths and small
dicts (never tensors or clients), and receive MLflow run ids explicitly."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff

from flows import ops

# Transient S3 / MLflow errors are retried with backoff; every retried step is idempotent.
RETRY = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)


@task(cache_policy=NO_CACHE, **RETRY)
def start_request(request_id: str, flow_run_id: str | None) -> dict:
    """Mark the request running and link it to this flow run; returns the request record."""
    return ops.start_request(request_id, flow_run_id)


@task(cache_policy=NO_CACHE, **RETRY)
def resolve_parent(model: str) -> dict:
    """The version a new erasure builds on: current production, else the base."""
    return ops.resolve_parent(model)


@task(cache_policy=INPUTS, persist_result=True)
def erase_concepts(key: str, model: str, parent_version: int, concepts: list[str], method: str,
                   request_ids: list[str], overrides: dict, parent_delta_dir: str | None = None) -> str:
    """Run ESD on one device at a time (global concurrency limit "gpu"); returns the staged delta folder."""
    with concurrency("gpu", occupy=1):
        return ops.erase(key, model, parent_version, concepts, method, request_ids, overrides, parent_delta_dir,
                         progress=_log_progress)


def _log_progress(iteration: int, loss: float) -> None:
    if iteration % 25 == 0:
        get_run_logger().info(f"erase: iteration {iteration}, loss {loss:.5f}")


@task(cache_policy=INPUTS, persist_result=True)
def evaluate_candidate(key: str, model: str, delta_dir: str, requested: list[str], earlier: list[str],
                       kind: str) -> dict:
    """Judge the candidate against its base; returns the report (grids as local paths)."""
    with concurrency("gpu", occupy=1):
        return ops.evaluate(key, model, delta_dir, requested, earlier, kind)


@task(cache_policy=NO_CACHE, **RETRY)
def register_candidate(model: str, delta_dir: str, request_ids: list[str], report: dict, run_id: str | None) -> int:
    """Register the delta as a new version (once per set of requests); metrics and grids on its run and the request's."""
    return ops.register(model, delta_dir, request_ids, report, run_id)


@task(cache_policy=NO_CACHE, **RETRY)
def apply_gate(report: dict, kind: str, model: str, version: int) -> dict:
    """The gate's verdict for this kind of request, recorded on the version; the version becomes the candidate."""
    verdict = ops.gate(report, kind)
    ops.record_verdict(model, version, verdict)
    ops.promote(model, version, "evaluated: gate " + ("passed" if verdict["passed"] else "failed"), ops.actor(),
                alias="candidate")
    return verdict


@task(cache_policy=NO_CACHE, **RETRY)
def promote_version(model: str, version: int, reason: str, actor: str) -> dict:
    """Point production at the version (its files verified first)."""
    return ops.promote(model, version, reason, actor)


@task(cache_policy=NO_CACHE, **RETRY)
def set_request_status(request_ids: list[str], status: str, fields: dict) -> None:
    """Move the requests' records to a status."""
    ops.set_status(request_ids, status, fields)


@task(cache_policy=NO_CACHE)
def publish_report(title: str, request_ids: list[str], model: str, version: int, report: dict, verdict: dict,
                   status: str, run_id: str | None) -> str:
    """A Prefect markdown artifact: request, version, metrics, gate verdict, before/after grids."""
    return ops.publish_report(title, request_ids, model, version, report, verdict, status, run_id)
