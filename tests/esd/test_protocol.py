"""The field's protocol on the toy world: UA / IRA / CRA on hand-made judged sets with known answers, the
balanced held-out evaluation set, and the held-out split never reaching an erasure method."""

import json

import pytest
import torch

from esd.erase import EraseConfig, erase
from esd.evaluate import toy as toy_eval
from esd.models import load_pipeline
from esd.toy import BASE_DIR, world


def judged(rows: list[tuple[str, str, str, str, str, str]]) -> toy_eval.Judged:
    """rows of (true shape, color, style, judged shape, color, style)."""
    truth = {"shape": [r[0] for r in rows], "color": [r[1] for r in rows], "style": [r[2] for r in rows]}
    pred = {"shape": [r[3] for r in rows], "color": [r[4] for r in rows], "style": [r[5] for r in rows]}
    return toy_eval.Judged([""] * len(rows), truth, pred, torch.zeros(len(rows), 3, 32, 32))


def test_ua_ira_cra_on_a_hand_made_set():
    vm, ic, ra = "Vela Moreau", "Ines Calder", "Rafe Lund"
    j = judged([
        # four Vela Moreau images: one still judged as her -> UA 3/4
        ("circle", "red", vm, "circle", "red", vm),
        ("circle", "red", vm, "circle", "red", "plain"),
        ("square", "blue", vm, "square", "blue", "none"),
        ("heart", "green", vm, "heart", "green", ic),
        # other styles: Ines Calder (held out) 1 of 2 right, Rafe Lund (held out) right, plain right
        ("circle", "red", ic, "circle", "red", ic),
        ("circle", "blue", ic, "square", "blue", "plain"),
        ("cross", "yellow", ra, "cross", "green", ra),
        ("diamond", "red", "plain", "diamond", "red", "plain"),
    ])
    r = toy_eval.unlearning(j, vm)
    assert r["kind"] == "style" and r["ua"] == pytest.approx(0.75) and r["ua_n"] == 4
    assert r["ua_se"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    # IRA on held-out artists only (Ines Calder, Rafe Lund): 2 of 3; on every other class: 3 of 4
    assert r["ira"] == pytest.approx(2 / 3) and r["ira_all"] == pytest.approx(3 / 4)
    # CRA: shape and color heads on the four images not naming her: shapes 3/4 right, colors 3/4 right
    assert r["cra"] == pytest.approx(6 / 8)
    assert r["lookalike"] == ic and r["lookalike_rate"] == pytest.approx(0.5)

    c = toy_eval.unlearning(j, "circle")
    assert c["kind"] == "object" and c["ua"] == pytest.approx(1 / 4)     # one circle image judged a square
    # held-out shapes (cross, diamond, heart) are all judged right
    assert c["ira"] == pytest.approx(1.0) and c["ira_n"] == 3


def test_pooled_mean_and_standard_error():
    rows = [{"ua": 1.0, "ua_se": 0.0}, {"ua": 0.5, "ua_se": 0.1}, {"ua": 0.9, "ua_se": 0.05}]
    mean, se = toy_eval.pooled(rows, "ua")
    assert mean == pytest.approx(0.8) and se == pytest.approx((0.01 + 0.0025) ** 0.5 / 3)


def test_the_evaluation_set_is_balanced_and_held_out():
    prompts, seeds, truth = toy_eval.eval_set()
    assert len(prompts) == len(set(seeds)) == len(world.STYLES) * len(world.SHAPES) * toy_eval.COLORS_PER_PAIR
    for style in world.STYLES:
        assert truth["style"].count(style) == len(world.SHAPES) * toy_eval.COLORS_PER_PAIR
    for shape in world.SHAPES:
        assert truth["shape"].count(shape) == len(world.STYLES) * toy_eval.COLORS_PER_PAIR
    assert all(world.in_held_out_template(p) for p in prompts)
    # and every held-out template is used
    used = {next(i for i, pat in enumerate(world.HELD_OUT_PATTERNS) if pat.fullmatch(p)) for p in prompts}
    assert used == set(range(len(world.HELD_OUT_PATTERNS)))


def test_the_quick_evaluation_set_is_the_full_sets_first_color_of_every_pair():
    full = dict(zip(*toy_eval.eval_set(seeds_per_prompt=2)[:2][::-1]))          # seed -> prompt
    prompts, seeds, truth = toy_eval.eval_set(seeds_per_prompt=2, colors_per_pair=1)
    assert len(prompts) == 2 * len(world.STYLES) * len(world.SHAPES)
    assert all(full[s] == p for p, s in zip(prompts, seeds))              # the same prompts with the same seeds
    pairs = {(st, sh) for st, sh in zip(truth["style"], truth["shape"])}
    assert pairs == {(st, sh) for st in world.STYLES for sh in world.SHAPES}
    assert set(truth["color"]) == set(world.COLOR_NAMES)
    with pytest.raises(ValueError, match="colors per artist x shape pair"):
        toy_eval.eval_set(colors_per_pair=4)


def test_held_out_split_is_disjoint_and_covers_every_look_alike_pair():
    assert not set(world.PRESERVE_ARTISTS) & set(world.HELD_OUT_ARTISTS)
    assert not set(world.PRESERVE_SHAPES) & set(world.HELD_OUT_SHAPES)
    assert len(world.ARTISTS) >= 10 and len(world.SHAPES) >= 6
    for a, b in world.LOOK_ALIKES.items():
        assert world.LOOK_ALIKES[b] == a and {a, b} & set(world.HELD_OUT_ARTISTS)


def _held_out_words(concept: str) -> list[str]:
    return [c for c in world.HELD_OUT_ARTISTS + world.HELD_OUT_SHAPES if c.lower() != concept.lower()]


def test_the_bases_method_defaults_hold_no_held_out_prompt_or_concept():
    defaults = json.loads((BASE_DIR / "esd_defaults.json").read_text())
    text = json.dumps(defaults)
    for concept in world.HELD_OUT_ARTISTS + world.HELD_OUT_SHAPES:
        assert concept.lower() not in text.lower(), concept
    for method in defaults.values():
        for kind_templates in (method.get("templates") or {}).values():
            for pair in kind_templates:
                for t in ([pair] if isinstance(pair, str) else pair):
                    filled = t.replace("{concept}", "Vela Moreau")
                    assert not world.in_held_out_template(filled), t


def test_the_committed_method_defaults_are_what_the_build_writes():
    """esd_defaults.json beside the committed base is the build's erase_defaults(), so a default changed in
    esd/toy/build.py cannot be left unwritten (or the other way round)."""
    from esd.toy.build import erase_defaults

    assert json.loads((BASE_DIR / "esd_defaults.json").read_text()) == json.loads(json.dumps(erase_defaults()))


@pytest.mark.parametrize("concept,method", [("Vela Moreau", "uce-robust"), ("circle", "uce"), ("Ines Calder", "uce"),
                                            ("Vela Moreau", "esd-x")])
def test_an_erasure_never_sees_a_held_out_prompt_or_concept(concept, method):
    pipe = load_pipeline(BASE_DIR)
    seen: list[str] = []
    encode_prompt = pipe.encode_prompt

    def spy(prompt, *args, **kwargs):
        seen.extend([prompt] if isinstance(prompt, str) else list(prompt))
        return encode_prompt(prompt, *args, **kwargs)

    pipe.encode_prompt = spy
    kind = "style" if concept in world.ARTISTS else "object"
    extra = {"iterations": 2} if method.startswith("esd") else {}
    erase(pipe, EraseConfig([concept], method=method, concept_kind=kind, **extra), progress=False)
    assert seen and any(concept.lower() in p.lower() for p in seen)
    for prompt in seen:
        assert not world.in_held_out_template(prompt), prompt
        for word in _held_out_words(concept):
            assert word.lower() not in prompt.lower(), (prompt, word)
