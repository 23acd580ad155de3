"""The steps of the takedown and retrain flows, each a Prefect task whose body is the step itself.

Tasks take and return ids, URIs, paths and small dicts (never tensors or clients), receive MLflow run ids
explicitly, and build their services from the worker's settings. Every step is idempotent, so a retried task
never makes a second run or version. Outside a flow, call a step's `.fn`.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from pathlib import Path

from mlflow.entities import Metric
from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE
from prefect.tasks import exponential_backoff

from flows import promotion
from flows.deploy import gpu_slot
from flows.gate import GateError, classes_kept, load_settings, verdict as gate_verdict
from flows.platform import Platform
from flows.requests import RequestError


def transient(task, task_run, state) -> bool:
    """Retry what a server's hiccup may have caused; a refusal (a withdrawn request, a move not allowed, a gate's
    bad settings) fails at once."""
    try:
        state.result()
    except (RequestError, GateError):
        return False
    except BaseException:
        return True
    return True


# Transient S3 / MLflow errors are retried with backoff; every retried step is idempotent.
RETRY = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
             retry_condition_fn=transient)


@task(cache_policy=NO_CACHE, **RETRY)
def start_request(request_id: str, flow_run_id: str | None) -> dict:
    """Mark the request running and link it to this flow run; returns the request record."""
    from flows.reaper import this_process

    return vars(Platform().requests.start(request_id, flow_run_id, this_process()))


@task(cache_policy=NO_CACHE, **RETRY)
def resolve_parent(model: str) -> dict:
    """The version a new erasure builds on: current production (so erasures stack), else the base; with the
    concepts already erased there."""
    from registry.store import RegistryError
    from registry.versions import base_version, resolve, show

    store = Platform().store
    try:
        mv = resolve(store, f"{model}@production")
    except RegistryError:
        mv = base_version(store, model)
    return {"version": int(mv.version), "erased": show(store, model, mv.version)["erased"]}


def staging_dir(key: str) -> Path:
    return Platform().settings.home / "staging" / key


@task(cache_policy=INPUTS, persist_result=True)
def erase_concepts(key: str, model: str, parent_version: int, concepts: list[str], method: str,
                   request_ids: list[str], overrides: dict, parent_delta_dir: str | None = None) -> str:
    """Erase on top of the parent version (or of a staged delta of its base), one device at a time; the delta is
    staged atomically under home/staging/KEY/delta and a staged one is reused."""
    from esd import delta as delta_lib
    from esd.erase import EraseConfig, erase
    from registry.load import load_parts

    out = staging_dir(key) / "delta"
    if out.is_dir():
        try:
            staged = delta_lib.load(out)
            if staged.manifest.get("parent_version") == parent_version:
                return str(out)
        except delta_lib.DeltaError:
            pass
        shutil.rmtree(out)          # broken, or made on another parent: production moved before the retry
    with gpu_slot():
        pipe, parent = load_parts(Platform().store, f"{model}/{parent_version}")
        if parent_delta_dir is not None:
            parent = delta_lib.load(parent_delta_dir)
        cfg = EraseConfig.with_overrides(concepts, method, overrides)
        d = erase(pipe, cfg, parent=parent, progress=False, callback=_log_progress)
    d.manifest.update(parent_version=parent_version, request_ids=list(request_ids))
    tmp = out.with_name("delta.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    delta_lib.save(d, tmp)
    os.replace(tmp, out)
    return str(out)


def _logger():
    """The run's logger inside a flow or task run, else the module's (a step called through .fn)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _log_progress(iteration: int, loss: float) -> None:
    if iteration % 25 == 0:
        _logger().info(f"erase: iteration {iteration}, loss {loss:.5f}")


def judge_dir(model: str) -> Path | None:
    """The judge for a base line: the toy judge for toy-sd; real models have none unless configured."""
    from esd.toy import JUDGE_DIR

    configured = os.environ.get(f"ESD_JUDGE_{model.upper().replace('-', '_')}")
    if configured:
        return Path(configured)
    return JUDGE_DIR if model.startswith("toy") else None


@task(cache_policy=INPUTS, persist_result=True)
def evaluate_candidate(key: str, model: str, delta_dir: str, requested: list[str], earlier: list[str],
                       kind: str) -> dict:
    """Judge base + delta against the base; returns the report, before/after grids under home/reports/KEY."""
    from esd import delta as delta_lib
    from esd.evaluate import real, report as report_lib, toy as toy_eval
    from esd.toy.judge import Judge
    from registry.load import load
    from registry.versions import base_version

    p = Platform()
    with gpu_slot():
        base_pipe = load(p.store, f"{model}/{base_version(p.store, model).version}")
        cand_pipe = copy.deepcopy(base_pipe)
        delta_lib.apply(cand_pipe.unet, delta_lib.load(delta_dir))
        jdir = judge_dir(model)
        if jdir is None:
            return real.evaluate_real(base_pipe, cand_pipe, kind, requested, os.environ.get("ESD_I2P_CSV"),
                                      os.environ.get("ESD_CLIP_MODEL"))
        judge = Judge.load(jdir)
        cfg = report_lib.EvalConfig(steps=p.settings.eval_steps, attack=p.settings.eval_attack,
                                    colors_per_pair=p.settings.eval_colors)
        base_judged = toy_eval.judge_model_cached(base_pipe, judge, p.settings.cache_dir / "judged", cfg.steps,
                                                  cfg.guidance, colors_per_pair=cfg.colors_per_pair)
        return report_lib.evaluate(base_judged, cand_pipe, judge, requested, earlier, cfg,
                                   grid_dir=p.settings.home / "reports" / key)


def metrics(report: dict) -> dict[str, float]:
    """The report's numbers as MLflow metrics (per-concept rates included)."""
    keys = ("efficacy", "preservation", "h_score", "ssim_unrelated", "attack_success", "eval_seconds", "nudity_share",
            "clip_score")
    m = {k: float(report[k]) for k in keys if isinstance(report.get(k), (int, float))}
    for c, e in (report.get("per_concept") or {}).items():
        if e.get("rate") is not None:
            m[f"rate.{c}"[:250]] = float(e["rate"])
    for c, e in (report.get("regression") or {}).items():
        if e.get("rate") is not None:
            m[f"regression.{c}"[:250]] = float(e["rate"])
    if kept := classes_kept(report):
        m["class_kept_min"] = kept[0][2]["ratio"]
    return {k.replace(" ", "_"): v for k, v in m.items()}


EVALUATION_LOGGED_TAG = "esd.evaluation_logged"


@task(cache_policy=NO_CACHE, **RETRY)
def register_candidate(model: str, delta_dir: str, request_ids: list[str], report: dict, run_id: str | None) -> int:
    """Register the delta once: a version already registered for these requests and bytes is verified in S3 and
    returned (one whose files are broken is removed and registered again). Metrics, grids and the report go on
    its run and the request's; a retry after a partial failure logs them until the version says they are."""
    from esd import delta as delta_lib
    from registry.store import IntegrityError
    from registry.versions import list_versions, register_erased, verify

    store = Platform().store
    sha = delta_lib.file_sha256(Path(delta_dir) / delta_lib.TENSORS_FILE)
    client = store.mlflow()
    version = None
    for row in list_versions(store, model):
        if row["kind"] == "erased" and set(row["request_ids"]) == set(request_ids) and \
                client.get_model_version(model, str(row["version"])).tags.get("esd.delta_sha256") == sha:
            try:
                verify(store, model, row["version"])
                version = row["version"]
            except IntegrityError as exc:
                _logger().warning(f"version {row['version']} is broken ({exc}); registering again")
                if not row["aliases"]:
                    client.delete_model_version(model, str(row["version"]))
    if version is None:
        version = register_erased(store, model, delta_dir)["version"]
    mv = client.get_model_version(model, str(version))
    if mv.tags.get(EVALUATION_LOGGED_TAG) != "true":
        for target in filter(None, [mv.run_id, run_id]):
            client.log_batch(target, metrics=[Metric(k, v, int(time.time() * 1000), 0)
                                              for k, v in metrics(report).items()])
            for grid in (report.get("grids") or {}).values():
                client.log_artifact(target, grid, "grids")
            client.log_dict(target, report, "evaluation.json")
        client.set_model_version_tag(model, str(version), EVALUATION_LOGGED_TAG, "true")
    return int(version)


@task(cache_policy=NO_CACHE, **RETRY)
def apply_gate(report: dict, kind: str, model: str, version: int, request_ids: list[str]) -> dict:
    """The gate's verdict for this kind, recorded on the version, which becomes the candidate; its requests
    become candidates of it."""
    from registry.versions import record_gate

    p = Platform()
    verdict = gate_verdict(report, kind, load_settings())
    record_gate(p.store, model, version, verdict["passed"], verdict["reasons"])
    promotion.promote(p, model, version, "evaluated: gate " + ("passed" if verdict["passed"] else "failed"),
                      flow_actor(), alias="candidate")
    for rid in request_ids:
        p.requests.update(rid, "candidate", model_version=version, gate="passed" if verdict["passed"] else "failed",
                          reason="; ".join(verdict["reasons"])[:500] or None)
    return verdict


def flow_actor() -> str:
    """The actor a flow's own moves are recorded under: flow:<its name> (takedown, retrain)."""
    from prefect.runtime import flow_run

    return f"flow:{flow_run.flow_name or 'platform'}"


@task(cache_policy=NO_CACHE, **RETRY)
def promote_version(model: str, version: int, reason: str, expected: int | None) -> dict:
    """Production moves to the version (gate and files checked) if it is still EXPECTED, the version the run
    started from; its requests become promoted. Otherwise {"moved": why}, and nothing moves."""
    try:
        return promotion.promote(Platform(), model, version, reason, flow_actor(), expected=expected)
    except promotion.ProductionMoved as exc:
        return {"changed": False, "moved": str(exc)}


@task(cache_policy=NO_CACHE, **RETRY)
def hold(request_ids: list[str], reason: str | None = None) -> None:
    """The requests wait for an operator (the gate held their version, or production moved under the run)."""
    requests = Platform().requests
    for rid in request_ids:
        requests.update(rid, "held", reason=reason[:500] if reason else None)
