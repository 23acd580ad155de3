"""The retrain flow: consolidate every active request into one erasure of the base, evaluate, register, gate."""

from __future__ import annotations

from prefect import flow

from flows import ops
from flows.tasks import (apply_gate, erase_concepts, evaluate_candidate, promote_version, publish_report,
                         register_candidate)

ACTIVE = ("promoted", "candidate", "held")


@flow(name="retrain", log_prints=True)
def retrain(model: str = "toy-sd", overrides: dict | None = None) -> dict:
    """Erase all active (not withdrawn, not failed) concepts of MODEL from its base in one multi-concept run."""
    active = ops.active_requests(model, ACTIVE)
    if not active:
        print(f"no active requests for {model}: nothing to retrain")
        return {"model": model, "model_version": None, "request_ids": []}
    ids = sorted(r["request_id"] for r in active)
    base = ops.base_version_number(model)
    key = "retrain-" + ops.digest(ids)
    # One erasure per method and kind (each kind's default method unless a request chose), each stacked on the last.
    delta_dir, erased = None, []
    for (method, kind), concepts in ops.group_by_method(active).items():
        delta_dir = erase_concepts(f"{key}-{method}-{kind}", model, base, concepts, method, ids,
                                   {"concept_kind": kind} | (overrides or {}), delta_dir)
        erased += concepts
    report = evaluate_candidate(key, model, delta_dir, erased, [], ops.kind_of(active))
    version = register_candidate(model, delta_dir, ids, report, None)
    verdict = apply_gate(report, ops.kind_of(active), model, version)
    if verdict["passed"]:
        promote_version(model, version, f"retrain of {len(ids)} request(s): gate passed", ops.actor())
    publish_report(f"Retrain {model}: {len(ids)} request(s)", ids, model, version, report, verdict,
                   "promoted" if verdict["passed"] else "held", None)
    return {"model": model, "model_version": version, "request_ids": ids, "verdict": verdict}
