"""The retrain flow: consolidate every active request into one erasure of the base, evaluate, register, gate."""

from __future__ import annotations

import hashlib

from prefect import flow

from esd import erase_defaults
from flows.deploy import lineage_slot
from flows.gate import load_settings
from flows.platform import Platform
from flows.report import publish_report
from flows.tasks import apply_gate, erase_concepts, evaluate_candidate, promote_version, register_candidate


def group_by_method(active: list[dict]) -> dict[tuple[str, str], list[str]]:
    """Concepts per (method, kind): one erasure each, since a method's defaults may depend on the kind."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in sorted(active, key=lambda r: r["request_id"]):
        if r["concept"] not in groups.setdefault((r["method"], r["kind"]), []):
            groups[(r["method"], r["kind"])].append(r["concept"])
    return groups


def kind_of(active: list[dict]) -> str:
    """The gate's kind for a mix of requests: their one kind, else custom."""
    kinds = {r["kind"] for r in active}
    return kinds.pop() if len(kinds) == 1 else "custom"


@flow(name="retrain", log_prints=True)
def retrain(model: str = "toy-sd", overrides: dict | None = None) -> dict:
    """Erase all active (not withdrawn, not failed) concepts of MODEL from its base in one multi-concept run."""
    from registry import aliases
    from registry.versions import base_version

    load_settings()          # the gate's and the operator's erase settings are checked before any work
    operator = erase_defaults.load()
    p = Platform()
    with lineage_slot(model):
        production = aliases.current(p.store, model)
        active = [vars(r) for r in p.requests.active(model)]
        if not active:
            print(f"no active requests for {model}: nothing to retrain")
            return {"model": model, "model_version": None, "request_ids": []}
        ids = sorted(r["request_id"] for r in active)
        base = int(base_version(p.store, model).version)
        key = "retrain-" + hashlib.sha256("|".join(ids).encode()).hexdigest()[:16]
        # One erasure per method and kind (each kind's default unless a request chose), solved with the ones before.
        delta_dir, erased = None, []
        for (method, kind), concepts in group_by_method(active).items():
            delta_dir = erase_concepts(f"{key}-{method}-{kind}", model, base, concepts, method, ids,
                                       erase_defaults.settings(method, kind, overrides, operator), delta_dir)
            erased += concepts
        report = evaluate_candidate(key, model, delta_dir, erased, [], kind_of(active))
        version = register_candidate(model, delta_dir, ids, report, None)
        # The requests keep their status until production moves: promotion then brings any held ones along.
        verdict = apply_gate(report, kind_of(active), model, version, [])
        status = "held"
        if verdict["passed"]:
            # a takedown promoted while this ran would be dropped: promote only over what the retrain saw
            moved = promote_version(model, version, f"retrain of {len(ids)} request(s): gate passed",
                                    production).get("moved")
            if moved:
                print(moved)
            else:
                status = "promoted"
    publish_report(f"Retrain {model}: {len(ids)} request(s)", ids, model, version, report, verdict, status, None,
                   prefix="retrain")
    return {"model": model, "model_version": version, "request_ids": ids, "verdict": verdict, "status": status}
