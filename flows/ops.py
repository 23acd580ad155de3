"""The steps behind the Prefect tasks, as plain functions over settings: erase, evaluate, register, gate, promote,
request records and the report. Each is idempotent, so a retried task never makes a second run or version."""

from __future__ import annotations

import getpass
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

from infra.settings import Settings
from flows.gate import GateSettings, verdict as gate_verdict
from flows.requests import Requests

DEFAULT_ACTOR = "esd-platform"


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings()


def store():
    return settings().store()


def requests() -> Requests:
    return Requests(store().mlflow())


def actor() -> str:
    return os.environ.get("ESD_ACTOR") or f"{getpass.getuser()}"


# --- requests ------------------------------------------------------------------------------------------------

def start_request(request_id: str, flow_run_id: str | None) -> dict:
    reqs = requests()
    req = reqs.require(request_id)
    if req.status in ("withdrawn",):
        raise RuntimeError(f"request {request_id} was withdrawn")
    return vars(reqs.update(request_id, "running", flow_run_id=flow_run_id))


def set_status(request_ids: list[str], status: str, fields: dict) -> None:
    reqs = requests()
    for rid in request_ids:
        reqs.update(rid, status, **fields)


# --- versions ------------------------------------------------------------------------------------------------

def resolve_parent(model: str) -> dict:
    """Current production (so erasures stack), else the base; with the concepts already erased there."""
    from registry.store import RegistryError
    from registry.versions import base_version, resolve, show

    s = store()
    try:
        mv = resolve(s, f"{model}@production")
    except RegistryError:
        mv = base_version(s, model)
    row = show(s, model, mv.version)
    return {"version": int(mv.version), "erased": row["erased"]}


def load_for_erasure(model: str, version: int):
    """(base pipeline, the version's delta or None): what esd.erase needs to build on a version."""
    from esd import delta as delta_lib
    from esd.models import load_pipeline
    from registry.store import VERSION_FILE, WEIGHTS, fetch
    from registry.versions import resolve

    s = store()
    mv = resolve(s, f"{model}/{version}")
    tree = fetch(s.tracking_uri, s.cache_dir, mv.source, (mv.tags or {}).get("esd.manifest_sha256", ""))
    manifest = json.loads((tree / VERSION_FILE).read_text())
    if manifest["kind"] == "base":
        return load_pipeline(tree / WEIGHTS), None
    base_tree = fetch(s.tracking_uri, s.cache_dir, manifest["base"]["source"], manifest["base"]["manifest_sha256"])
    return load_pipeline(base_tree / WEIGHTS), delta_lib.load(tree / WEIGHTS)


def staging_dir(key: str) -> Path:
    return settings().home / "staging" / key


def erase(key: str, model: str, parent_version: int, concepts: list[str], method: str, request_ids: list[str],
          overrides: dict, parent_delta_dir: str | None = None, progress=None) -> str:
    """ESD on top of the parent version (or of a staged delta of its base); staged atomically under
    home/staging/KEY/delta."""
    from esd import delta as delta_lib
    from esd.erase import EraseConfig, erase as run_erase

    out = staging_dir(key) / "delta"
    if out.is_dir():
        try:
            delta_lib.load(out)
            return str(out)
        except delta_lib.DeltaError:
            shutil.rmtree(out)
    pipe, parent = load_for_erasure(model, parent_version)
    if parent_delta_dir is not None:
        parent = delta_lib.load(parent_delta_dir)
    cfg = EraseConfig(list(concepts), method=method, **overrides)
    d = run_erase(pipe, cfg, parent=parent, progress=False, callback=progress)
    d.manifest.update(parent_version=parent_version, request_ids=list(request_ids))
    tmp = out.with_name("delta.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    delta_lib.save(d, tmp)
    os.replace(tmp, out)
    return str(out)


def judge_dir(model: str) -> Path | None:
    """The judge for a base line: the toy judge for toy-sd; real models have none unless configured."""
    from esd.toy import JUDGE_DIR

    configured = os.environ.get(f"ESD_JUDGE_{model.upper().replace('-', '_')}")
    if configured:
        return Path(configured)
    return JUDGE_DIR if model.startswith("toy") else None


def evaluate(key: str, model: str, delta_dir: str, requested: list[str], earlier: list[str], kind: str) -> dict:
    """The evaluation report of base + delta against the base, with before/after grids under home/reports/KEY."""
    from esd import delta as delta_lib
    from esd.evaluate import real, report as report_lib, toy as toy_eval
    from esd.toy.judge import Judge
    from registry.versions import base_version

    base_v = int(base_version(store(), model).version)
    base_pipe, _ = load_for_erasure(model, base_v)
    cand_pipe, _ = load_for_erasure(model, base_v)
    delta_lib.apply(cand_pipe.unet, delta_lib.load(delta_dir))
    out = settings().home / "reports" / key
    jdir = judge_dir(model)
    if jdir is None:
        rep = real.evaluate_real(base_pipe, cand_pipe, kind, requested, os.environ.get("ESD_I2P_CSV"),
                                 os.environ.get("ESD_CLIP_MODEL"))
        return rep
    judge = Judge.load(jdir)
    # The recovery attack costs ~30 s a concept on the toy: on where the time budget allows (ESD_EVAL_ATTACK=true);
    # `esd bench quality` always runs it.
    cfg = report_lib.EvalConfig(attack=os.environ.get("ESD_EVAL_ATTACK", "false").lower() == "true")
    base_judged = toy_eval.judge_model_cached(base_pipe, judge, settings().cache_dir / "judged", cfg.steps,
                                              cfg.guidance)
    return report_lib.evaluate(base_judged, cand_pipe, judge, requested, earlier, cfg, grid_dir=out)


def gate(report: dict, kind: str) -> dict:
    return gate_verdict(report, kind, GateSettings())


def _metrics(report: dict) -> dict[str, float]:
    keys = ("efficacy", "preservation", "h_score", "ssim_unrelated", "attack_success", "eval_seconds", "nudity_share",
            "clip_score")
    m = {k: float(report[k]) for k in keys if isinstance(report.get(k), (int, float))}
    for c, e in (report.get("per_concept") or {}).items():
        if e.get("rate") is not None:
            m[f"rate.{c}"[:250]] = float(e["rate"])
    for c, e in (report.get("regression") or {}).items():
        if e.get("rate") is not None:
            m[f"regression.{c}"[:250]] = float(e["rate"])
    return {k.replace(" ", "_"): v for k, v in m.items()}


def register(model: str, delta_dir: str, request_ids: list[str], report: dict, run_id: str | None) -> int:
    """Register the delta once: a version already registered for these requests is returned, not duplicated."""
    from esd import delta as delta_lib
    from registry.versions import list_versions, register_erased

    s = store()
    sha = delta_lib.file_sha256(Path(delta_dir) / delta_lib.TENSORS_FILE)
    for row in list_versions(s, model):
        if row["kind"] == "erased" and set(row["request_ids"]) == set(request_ids) and \
                s.mlflow().get_model_version(model, str(row["version"])).tags.get("esd.delta_sha256") == sha:
            return row["version"]
    info = register_erased(s, model, delta_dir)
    version = int(info["version"])
    client = s.mlflow()
    metrics = _metrics(report)
    for target in filter(None, [info.get("run_id"), run_id]):
        for k, v in metrics.items():
            client.log_metric(target, k, v)
        for grid in (report.get("grids") or {}).values():
            client.log_artifact(target, grid, "grids")
        client.log_dict(target, report, "evaluation.json")
    return version


def record_verdict(model: str, version: int, verdict: dict) -> None:
    client = store().mlflow()
    client.set_model_version_tag(model, str(version), "esd.gate", "passed" if verdict["passed"] else "failed")
    client.set_model_version_tag(model, str(version), "esd.gate_reasons", json.dumps(verdict["reasons"])[:5000])


def promote(model: str, version: int, reason: str, actor_name: str, alias: str = "production",
            force: bool = False) -> dict:
    from registry import aliases

    return aliases.promote(store(), model, int(version), reason, actor_name, alias=alias, force=force)


class OperationError(ValueError):
    """An operator action refused; one line naming why. Nothing was moved."""


def operator_promote(model: str, version: int, reason: str, actor_name: str, force: bool = False) -> dict:
    """Promote (the registry refuses a version that failed its gate unless forced); held requests follow."""
    if not reason or not reason.strip():
        raise OperationError("a reason is required")
    event = promote(model, version, reason, actor_name, force=force)
    requests_follow(model, version)
    return event


def requests_follow(model: str, version: int) -> None:
    """The candidate or held requests a version serves become promoted with it."""
    from registry.versions import resolve

    tags = resolve(store(), f"{model}/{version}").tags or {}
    reqs = requests()
    for rid in json.loads(tags.get("esd.request_ids", "[]")):
        req = reqs.get(rid)
        if req is not None and req.status in ("candidate", "held"):
            reqs.update(rid, "promoted", model_version=int(version))


def operator_rollback(model: str, reason: str, actor_name: str, to: int | None = None) -> dict:
    from registry import aliases

    if not reason or not reason.strip():
        raise OperationError("a reason is required")
    return aliases.rollback(store(), model, reason, actor_name, to)


def withdraw(request_id: str, reason: str, actor_name: str) -> dict:
    if not reason or not reason.strip():
        raise OperationError("a reason is required")
    reqs = requests()
    req = reqs.require(request_id)
    if req.status == "withdrawn":
        return vars(req)
    return vars(reqs.update(request_id, "withdrawn", reason=f"{actor_name}: {reason.strip()}"[:500]))


def fail_requests(request_ids: list[str], exc: BaseException) -> None:
    """A flow that broke leaves its requests failed with the reason, never stuck in running."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
    try:
        set_status(request_ids, "failed", {"reason": first})
    except Exception:
        pass


def active_requests(model: str, statuses: tuple[str, ...]) -> list[dict]:
    return [vars(r) for r in requests().list() if r.model == model and r.status in statuses]


def group_by_method(active: list[dict]) -> dict[tuple[str, str], list[str]]:
    """Concepts per (method, kind): one erasure each, since a method's defaults may depend on the kind."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in sorted(active, key=lambda r: r["request_id"]):
        if r["concept"] not in groups.setdefault((r["method"], r["kind"]), []):
            groups[(r["method"], r["kind"])].append(r["concept"])
    return groups


def kind_of(active: list[dict]) -> str:
    kinds = {r["kind"] for r in active}
    return kinds.pop() if len(kinds) == 1 else "custom"


def base_version_number(model: str) -> int:
    from registry.versions import base_version

    return int(base_version(store(), model).version)


def digest(items: list[str]) -> str:
    import hashlib

    return hashlib.sha256("|".join(items).encode()).hexdigest()[:16]


# --- the report ----------------------------------------------------------------------------------------------

def grid_links(run_id: str | None, report: dict) -> dict[str, str]:
    if not run_id:
        return {}
    uri = settings().tracking_uri
    return {c: f"{uri}/get-artifact?path={quote('grids/' + Path(p).name)}&run_uuid={run_id}"
            for c, p in (report.get("grids") or {}).items()}


def markdown(title: str, request_ids: list[str], model: str, version: int, report: dict, verdict: dict,
             status: str, run_id: str | None) -> str:
    lines = [f"# {title}", "", f"- requests: {', '.join(request_ids)}", f"- model version: `{model}/{version}`",
             f"- status: **{status}**", f"- gate: **{'passed' if verdict['passed'] else 'failed'}**"]
    lines += [f"  - {r}" for r in verdict["reasons"]]
    lines += ["", "| metric | value |", "| --- | --- |"]
    for k, v in _metrics(report).items():
        lines.append(f"| {k} | {v:.3f} |")
    for missing in report.get("not_computed", []):
        lines.append(f"| {missing} | not computed |")
    links = grid_links(run_id, report)
    for concept, path in (report.get("grids") or {}).items():
        lines += ["", f"## {concept}: base (left) | candidate (right)", f"local file: `{path}`"]
        if concept in links:
            lines.append(f"![{concept}]({links[concept]})")
    return "\n".join(lines)


def publish_report(title: str, request_ids: list[str], model: str, version: int, report: dict, verdict: dict,
                   status: str, run_id: str | None = None) -> str:
    from prefect.artifacts import create_markdown_artifact

    md = markdown(title, request_ids, model, version, report, verdict, status, run_id)
    key = "-".join(["takedown", *request_ids])[:100].lower()
    key = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in key)
    create_markdown_artifact(markdown=md, key=key, description=title)
    return md
