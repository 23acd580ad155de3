"""Benchmarks: `esd bench quality` (erasure on the toy world, judged)."""

from __future__ import annotations

import time
from pathlib import Path

from esd import sample
from esd.erase import EraseConfig, erase
from esd.evaluate import toy as toy_eval
from esd.models import load_pipeline
from esd.toy import BASE_DIR, JUDGE_DIR
from esd.toy.judge import Judge

QUALITY_ERASURES = [("circle", "esd-u"), ("Vela Moreau", "esd-x")]


def quality(base_dir: Path = BASE_DIR, judge_dir: Path = JUDGE_DIR, out_dir: Path | None = None,
            erasures=QUALITY_ERASURES, overrides: dict | None = None, progress: bool = True, log=print) -> dict:
    """Judge the base, run each erasure at default settings, judge again; grids go to out_dir."""
    judge = Judge.load(judge_dir)
    t0 = time.time()
    base = toy_eval.judge_model(load_pipeline(base_dir), judge, progress=progress)
    log(f"base judged in {time.time() - t0:.0f}s")
    result = {"base": toy_eval.base_summary(base), "erasures": []}
    for concept, method in erasures:
        pipe = load_pipeline(base_dir)
        t0 = time.time()
        delta = erase(pipe, EraseConfig([concept], method=method, **(overrides or {})), progress=progress)
        erase_s = time.time() - t0
        t0 = time.time()
        erased = toy_eval.judge_model(pipe, judge, progress=progress)
        row = toy_eval.compare(base, erased, concept)
        row.update(method=method, erase_seconds=erase_s, eval_seconds=time.time() - t0, delta_bytes=delta.num_bytes,
                   hyperparameters=delta.manifest["hyperparameters"])
        if out_dir is not None:
            row["grid"] = str(save_before_after(base, erased, concept, out_dir))
        result["erasures"].append(row)
    return result


def save_before_after(base: toy_eval.Judged, erased: toy_eval.Judged, concept: str, out_dir: Path,
                      count: int = 8) -> Path:
    """A grid of the first prompts naming the concept: base on top, erased below."""
    head, cls = toy_eval.concept_attribute(concept)
    idx = [i for i, t in enumerate(base.truth[head]) if t == cls][::3][:count]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{concept.lower().replace(' ', '-')}-before-after.png"
    sample.grid([base.images[idx], erased.images[idx]]).save(path)
    return path
