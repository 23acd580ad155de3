"""End to end on the committed toy base: each kind's default method erases a concept and keeps the rest, judged
on held-out prompts."""

import pytest
import torch

from esd.erase import EraseConfig, erase
from esd.methods import DEFAULT_BY_KIND
from esd.evaluate import report as report_lib
from esd.evaluate import toy as toy_eval
from esd.models import load_pipeline
from esd.toy import BASE_DIR, JUDGE_DIR
from esd.toy.judge import Judge
from flows.gate import verdict
from tests.conftest import SHORT_ERASE

# A reduced budget: 6 DDIM steps per judged image (the benchmark uses 20; the base is judged at 96.6-99.6% per
# head at 6 steps), and the style default's inversion at the tests' SHORT_ERASE. The object default runs its own
# iterations: its retain loss holds the space between its preserve prompts, and at half of them circle is not gone.
STEPS = 6
BUDGET = {m: v for m, v in SHORT_ERASE.items() if m != "esd-u-retain"}


@pytest.fixture(scope="module")
def judge():
    return Judge.load(JUDGE_DIR)


@pytest.fixture(scope="module")
def base_judged(judge, tmp_path_factory):
    return toy_eval.judge_model_cached(load_pipeline(BASE_DIR), judge, tmp_path_factory.mktemp("judged"), STEPS)


def default_config(concept: str, kind: str) -> EraseConfig:
    """The kind's default method on the concept, at the tests' reduced budget (BUDGET) where it has one."""
    method = DEFAULT_BY_KIND[kind]
    return EraseConfig([concept], method=method, concept_kind=kind, **BUDGET.get(method, {}))


def erased_by_default(concept: str, kind: str, parent=None):
    pipe = load_pipeline(BASE_DIR)
    delta = erase(pipe, default_config(concept, kind), parent=parent, progress=False)
    return pipe, delta


@pytest.fixture(scope="module")
def circle_erased():
    return erased_by_default("circle", "object")


def test_the_style_default_erases_an_artist_on_a_lineage_and_keeps_the_others(base_judged, circle_erased, judge):
    """Vela Moreau erased by the style default on top of the circle erasure (a lineage of two takedowns), judged
    once: she is gone, the other artists, the colors and the other shapes stay, and circle stays erased."""
    _, circle_delta = circle_erased
    stacked = load_pipeline(BASE_DIR)
    erase(stacked, default_config("Vela Moreau", "style"), parent=circle_delta, progress=False)
    erased = toy_eval.judge_model(stacked, judge, steps=STEPS)
    before, after = toy_eval.unlearning(base_judged, "Vela Moreau"), toy_eval.unlearning(erased, "Vela Moreau")
    assert after["ua"] - before["ua"] >= 0.80
    assert after["ira"] >= 0.85 and after["ira_all"] >= 0.85
    # the other heads on prompts not naming her (the shape head on the shapes the lineage did not erase)
    rest = [i for i, s in enumerate(erased.truth["style"]) if s != "Vela Moreau"]
    for head, where in (("color", rest), ("shape", [i for i in rest if erased.truth["shape"][i] != "circle"])):
        assert sum(erased.pred[head][i] == erased.truth[head][i] for i in where) / len(where) >= 0.85, head
    report = report_lib.build_report(base_judged, erased, stacked, judge, ["Vela Moreau"], ["circle"],
                                     report_lib.EvalConfig(steps=STEPS, attack=False), None, 0.0)
    circle = report["regression"]["circle"]
    assert circle["rate"] <= circle["base_rate"] - 0.4
    # per class, on the same unrelated images: the erased concepts are not among them and each head's classes add
    # up to the head's accuracy
    by_class = report["accuracy_by_class"]
    assert "Vela Moreau" not in by_class["style"] and "circle" not in by_class["shape"]
    assert "Ines Calder" in by_class["style"]
    for head, classes in by_class.items():
        n = sum(a["images"] for a in classes.values())
        assert n == len([i for i in range(len(erased.prompts)) if erased.truth["style"][i] != "Vela Moreau"
                         and erased.truth["shape"][i] != "circle"])
        for who in ("base", "candidate"):
            weighted = sum(a[who] * a["images"] for a in classes.values()) / n
            assert weighted == pytest.approx(report["accuracy_unrelated"][head][who]), (head, who)


def test_the_object_default_erases_circle_and_keeps_the_other_shapes_colors_and_styles(base_judged, circle_erased,
                                                                                       judge):
    pipe, _ = circle_erased
    erased = toy_eval.judge_model(pipe, judge, steps=STEPS)
    cmp = toy_eval.compare(base_judged, erased, "circle")
    # at most one image in ten still a circle, at the tests' 6 judging steps (the benchmark's 20: UA 97-100%)
    assert cmp["target_base"] >= 0.90 and cmp["target_erased"] <= 0.10, cmp
    after = toy_eval.unlearning(erased, "circle")
    # the held-out shapes (cross, diamond, heart: never in the method's preservation set) are kept
    assert after["ira"] >= 0.85 and after["cra"] >= 0.90, after


def test_the_base_submitted_as_erased_fails_the_gate(base_judged, judge):
    # the candidate is the base itself: its judged images are the base's (same weights, same seeds)
    report = report_lib.build_report(base_judged, base_judged, load_pipeline(BASE_DIR), judge, ["circle"], [],
                                     report_lib.EvalConfig(steps=STEPS, attack=False), None, 0.0)
    assert report["per_concept"]["circle"]["rate"] >= 0.8
    assert report["preservation"] == pytest.approx(1.0)
    v = verdict(report, "object")
    assert not v["passed"] and any("'circle' still shown" in r for r in v["reasons"])


def test_a_parent_concept_that_returns_fails_regression(base_judged, judge):
    # A candidate claiming to build on the circle erasure but made from the plain base: circle is back.
    report = report_lib.build_report(base_judged, base_judged, load_pipeline(BASE_DIR), judge, ["Vela Moreau"],
                                     ["circle"], report_lib.EvalConfig(steps=STEPS, attack=False), None, 0.0)
    v = verdict(report, "style")
    assert any("earlier erased 'circle' came back" in r for r in v["reasons"])
    # the real stacked model keeps circle erased: the style test above


def test_recovery_attack_learns_the_concept_back(base_judged, circle_erased, judge):
    """The attack is real: an untrained placeholder gives almost no circles, ten steps of textual inversion on the
    base bring circle back in most images (35 of 39 at 6 steps); on the erased model it recovers less, and leaves it
    unchanged. Its images are generated as the base's were judged (STEPS DDIM steps)."""
    from functools import partial

    from esd.delta import state_sha256
    from esd.evaluate.attack import recover as recover_at

    recover = partial(recover_at, sample_steps=STEPS)
    base = load_pipeline(BASE_DIR)
    untrained = recover(base, judge, base_judged, "circle", steps=0)
    learned = recover(base, judge, base_judged, "circle", steps=10)
    circles = sum(t == "circle" for t in base_judged.truth["shape"])
    assert untrained["images"] == learned["images"] == circles and untrained["final_loss"] is None
    assert untrained["success"] <= 0.10 and learned["success"] >= 0.85
    pipe, _ = circle_erased
    before = state_sha256(pipe.unet.state_dict()), state_sha256(pipe.text_encoder.state_dict())
    prompt_embedding = pipe.encode_prompt(["a red cat"], "cpu", 1, False)[0]
    on_erased = recover(pipe, judge, base_judged, "circle", steps=10)
    assert on_erased["success"] < learned["success"]
    assert recover(pipe, judge, base_judged, "circle", steps=10) == on_erased          # seeded: the same again
    # the attack leaves the candidate as it found it: weights and the placeholder word's embedding
    assert (state_sha256(pipe.unet.state_dict()), state_sha256(pipe.text_encoder.state_dict())) == before
    assert torch.equal(pipe.encode_prompt(["a red cat"], "cpu", 1, False)[0], prompt_embedding)


def test_judgements_are_kept_per_model_and_judge(judge, tmp_path):
    """A base judged once is read back from the cache; a different judge (or model) is judged anew, never given
    another's verdicts (on the quick set: one color per artist x shape pair)."""
    import copy
    import json

    pipe = load_pipeline(BASE_DIR)
    first = toy_eval.judge_model_cached(pipe, judge, tmp_path, steps=1, colors_per_pair=1)
    [meta] = tmp_path.glob("*.json")
    marked = json.loads(meta.read_text())
    marked["pred"]["style"][0] = "marked"
    meta.write_text(json.dumps(marked))
    assert toy_eval.judge_model_cached(pipe, judge, tmp_path, steps=1, colors_per_pair=1).pred["style"][0] == "marked"

    other = copy.deepcopy(judge)
    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    again = toy_eval.judge_model_cached(pipe, other, tmp_path, steps=1, colors_per_pair=1)
    assert len(list(tmp_path.glob("*.json"))) == 2 and again.pred["style"][0] != "marked"
    assert torch.equal(again.images, first.images)      # the same images, judged by the other judge
