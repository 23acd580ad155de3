"""The evaluation report of a candidate on the toy world: efficacy, regression, preservation, image distance,
H score and the recovery attack, with before/after grids.

  efficacy      per requested concept: 1 - the share of its prompts' images still judged as it
  regression    every concept erased earlier in the lineage, re-checked the same way
  preservation  judge accuracy on prompts naming no erased concept, candidate / base (capped at 1)
  by class      the same accuracy per class of each head (an artist, a shape, a color), base and candidate
  distance      SSIM between base and candidate images of those unrelated prompts, same seeds
  h_score       harmonic mean of mean efficacy and preservation (as MACE's H)
  attack        share of images judged as the concept after a soft-prompt recovery attack
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics.functional import structural_similarity_index_measure as ssim

from esd import sample
from esd.evaluate import attack as attack_lib
from esd.evaluate import toy as toy_eval
from esd.toy.judge import HEADS, Judge


@dataclass
class EvalConfig:
    seeds_per_prompt: int = 1
    steps: int = toy_eval.EVAL_STEPS
    guidance: float = toy_eval.EVAL_GUIDANCE
    attack: bool = True
    attack_steps: int = attack_lib.DEFAULT_STEPS
    colors_per_pair: int = toy_eval.COLORS_PER_PAIR


def h_score(efficacy: float, preservation: float) -> float:
    return 0.0 if efficacy + preservation == 0 else 2 * efficacy * preservation / (efficacy + preservation)


def _names(judged: toy_eval.Judged, concepts: list[str]):
    attrs = [a for a in (toy_eval.concept_attribute(c) for c in concepts) if a]
    return lambda i: any(judged.truth[h][i] == cls for h, cls in attrs)


def evaluate(base: toy_eval.Judged, candidate_pipe, judge: Judge, requested: list[str], earlier: list[str],
             cfg: EvalConfig = EvalConfig(), grid_dir: Path | None = None, progress: bool = False) -> dict:
    """Judge a candidate against the judged base for the concepts it erases now and erased before."""
    t0 = time.time()
    cand = toy_eval.judge_model(candidate_pipe, judge, cfg.seeds_per_prompt, cfg.steps, cfg.guidance, progress,
                                cfg.colors_per_pair)
    return build_report(base, cand, candidate_pipe, judge, requested, earlier, cfg, grid_dir, t0)


def build_report(base: toy_eval.Judged, cand: toy_eval.Judged, candidate_pipe, judge: Judge, requested: list[str],
                 earlier: list[str], cfg: EvalConfig, grid_dir: Path | None, t0: float) -> dict:
    """The report from the judged base and candidate; runs the recovery attack on the candidate pipeline."""
    unknown = [c for c in requested + earlier if toy_eval.concept_attribute(c) is None]
    if unknown:
        raise ValueError(f"the toy judge knows no concept {unknown[0]!r}")

    def still_shown(j: toy_eval.Judged, concept: str) -> float:
        return j.rate(*toy_eval.concept_attribute(concept))

    efficacy = {c: {"base_rate": still_shown(base, c), "rate": still_shown(cand, c),
                    "efficacy": 1 - still_shown(cand, c)} for c in requested}
    regression = {c: {"base_rate": still_shown(base, c), "rate": still_shown(cand, c)} for c in earlier}

    erased = _names(base, requested + earlier)
    unrelated = [i for i in range(len(base.prompts)) if not erased(i)]
    keep = set(unrelated).__contains__
    acc = {h: {"base": base.accuracy(h, keep), "candidate": cand.accuracy(h, keep)} for h in HEADS}
    preservation = min(1.0, sum(v["candidate"] for v in acc.values()) / max(1e-9, sum(v["base"] for v in acc.values())))
    by_class = {h: {cls: {"base": base.rate(h, cls, keep), "candidate": cand.rate(h, cls, keep),
                          "images": sum(keep(i) and t == cls for i, t in enumerate(base.truth[h]))}
                    for cls in sorted({base.truth[h][i] for i in unrelated})} for h in HEADS}
    distance = ssim(cand.images[unrelated], base.images[unrelated], data_range=1.0).item()
    mean_eff = sum(e["efficacy"] for e in efficacy.values()) / len(efficacy)

    report = {"efficacy": mean_eff, "per_concept": efficacy, "regression": regression,
              "preservation": preservation, "accuracy_unrelated": acc, "accuracy_by_class": by_class,
              "ssim_unrelated": distance,
              "h_score": h_score(mean_eff, preservation), "attack_success": None, "attack": {},
              "images": len(cand.prompts)}
    if cfg.attack:
        for c in requested:
            report["attack"][c] = attack_lib.recover(candidate_pipe, judge, base, c, steps=cfg.attack_steps,
                                                     sample_steps=cfg.steps, guidance=cfg.guidance)
        report["attack_success"] = max(a["success"] for a in report["attack"].values())
    if grid_dir is not None:
        report["grids"] = {c: str(before_after_grid(base, cand, c, grid_dir)) for c in requested + earlier}
    report["eval_seconds"] = time.time() - t0
    return report


def before_after_grid(base: toy_eval.Judged, cand: toy_eval.Judged, concept: str, out_dir: Path,
                      rows: int = 8) -> Path:
    """Rows: prompts naming the concept, each labelled with its prompt; columns "before" (the base) and "after"
    (the candidate), with the judge's verdict on the concept under each candidate image's row label."""
    head, cls = toy_eval.concept_attribute(concept)
    idx = [i for i, t in enumerate(base.truth[head]) if t == cls]
    idx = idx[:: max(1, len(idx) // rows)][:rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{concept.lower().replace(' ', '-')}-before-after.png"
    still = lambda judged, i: judged.pred[head][i] == cls
    labels = [f"{base.prompts[i]}  [after: {'still ' + concept if still(cand, i) else 'gone'}]" for i in idx]
    sample.grid([torch.stack([base.images[i], cand.images[i]]) for i in idx], row_labels=labels,
                col_labels=["before", "after"],
                title=f"{concept}: before = base model, after = candidate (judge's verdict in brackets)").save(path)
    return path
