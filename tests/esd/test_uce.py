"""Closed-form erasure (esd/uce.py) on the tiny random SD: which tensors change, determinism, the solve meeting its
targets, RECE hardening, bad input, stacking."""

import pytest
import torch

from esd import delta as delta_lib
from esd import uce
from esd.erase import EraseConfig, EraseError, erase
from esd.models import load_pipeline

MANIFEST_KEYS = {"base_sha256", "method", "concepts", "anchor", "seed", "dtype", "prediction_type", "hyperparameters",
                 "final_loss", "erasures", "all_concepts", "format", "parameters", "bytes", "tensors_sha256",
                 "library_versions"}


def kv(name: str) -> bool:
    return (".attn2.to_k." in name or ".attn2.to_v." in name) and name.endswith(".weight")


def assert_same_unet(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key/value projection weights, float64."""
    return {n: t.detach().double().clone() for n, t in tensors.items() if kv(n)}


def error(new: dict, old: dict, x: torch.Tensor, target: torch.Tensor) -> float:
    """sum over projections and tokens of ||W_new x - W_old target||^2."""
    return sum(float((x @ new[n].T - target @ old[n].T).pow(2).sum()) for n in old)


@pytest.mark.parametrize("method", ["uce", "uce-robust"])
def test_only_cross_attention_keys_and_values_change(tiny_sd, method):
    pipe = load_pipeline(tiny_sd)
    every_kv = {n for n, _ in pipe.unet.named_parameters() if kv(n)}
    # iterations / lr / eta are ESD's: accepted, not used, not recorded
    d = erase(pipe, EraseConfig(["circle"], method=method, iterations=5, lr=1e-3, eta=2.0,
                                templates=["a {concept}", "a red {concept}"], preserve=["square"]), progress=False)
    assert set(d.tensors) == every_kv
    assert set(d.manifest) == MANIFEST_KEYS and d.manifest["method"] == method
    hp = d.manifest["hyperparameters"]
    assert hp["templates"] == ["a {concept}", "a red {concept}"] and hp["preserve"] == ["square"]
    assert hp["rounds"] == (2 if method == "uce-robust" else 0)
    assert {"erase_scale", "preserve_scale", "lamb", "push", "guide"} <= set(hp)
    assert not {"iterations", "lr", "eta", "sample_steps"} & set(hp)
    assert d.manifest["erasures"] == [{"concepts": ["circle"], "method": method, "anchor": None, "hyperparameters": hp}]
    # base + delta is exactly the edited model
    fresh = load_pipeline(tiny_sd)
    delta_lib.apply(fresh.unet, d)
    assert_same_unet(fresh.unet, pipe.unet)


def test_same_config_same_delta_and_another_preserve_set_differs(tiny_sd):
    run = lambda **kw: erase(load_pipeline(tiny_sd), EraseConfig(["circle"], method="uce", **kw), progress=False)
    a, b = run(preserve=["square"]), run(preserve=["square"])
    c = run(preserve=["triangle"])
    assert a.manifest["tensors_sha256"] == b.manifest["tensors_sha256"]
    assert a.manifest["tensors_sha256"] != c.manifest["tensors_sha256"]


def test_the_edit_meets_its_targets_and_keeps_preserved_values(tiny_sd):
    """The tiny text encoder has d = 32 and each prompt gives ~76 aligned tokens (final word, EOS, padding) whose
    LayerNorm'd embeddings span only d - 1 directions, so no linear edit maps every token exactly; lamb also keeps W
    near itself. What must hold: the concept's own word token lands on its target (error down > 10x), the whole
    aligned set moves most of the way (> 3x), and a preserved concept's keys/values move < 1% of their size and
    far less than without the preserve term."""
    pipe = load_pipeline(tiny_sd)
    old = weights(dict(pipe.unet.named_parameters()))
    c, g = uce.aligned(pipe, [("circle", "")])
    p, _ = uce.aligned(pipe, [("square", "square")])
    drift = lambda new: error(new, old, p, p) / error(old, old, p, torch.zeros_like(p))
    edited = {}
    for push in (0.0, 1.0):
        target = (1 + push) * g - push * c
        new = edited[push] = weights(erase(load_pipeline(tiny_sd), EraseConfig(["circle"], method="uce", push=push),
                                           progress=False).tensors)
        assert error(new, old, c[:1], target[:1]) < error(old, old, c[:1], target[:1]) / 10
        assert error(new, old, c, target) < error(old, old, c, target) / 3
    kept = weights(erase(load_pipeline(tiny_sd), EraseConfig(["circle"], method="uce", preserve=["square"]),
                         progress=False).tensors)
    assert error(kept, old, c[:1], g[:1]) < error(old, old, c[:1], g[:1]) / 5
    assert drift(kept) < 0.01 and drift(kept) < drift(edited[0.0]) / 5


def test_robust_rounds_make_the_concept_harder_to_recover(tiny_sd):
    """RECE's attack in closed form: the embedding e* whose edited keys/values best reproduce the original
    concept's; after uce-robust its best reproduction is measurably worse than after plain uce."""
    pipe = load_pipeline(tiny_sd)
    old = weights(dict(pipe.unet.named_parameters()))
    c, _ = uce.aligned(pipe, [("circle", "")])

    def recovery_error(method):
        new = weights(erase(load_pipeline(tiny_sd), EraseConfig(["circle"], method=method), progress=False).tensors)
        s_new = sum(new[n].T @ new[n] for n in old)
        cross = sum(new[n].T @ old[n] for n in old)
        k = torch.linalg.solve(s_new + 0.1 * torch.eye(len(s_new), dtype=torch.float64), cross)   # e* = K c
        return error(new, old, c @ k.T, c)

    plain, robust = recovery_error("uce"), recovery_error("uce-robust")
    assert robust > 3 * plain


@pytest.mark.parametrize("kw, message", [
    (dict(templates=["a picture of circles"]), "does not contain {concept}"),
    (dict(templates=[]), "templates must be a non-empty list"),
    (dict(templates=["{concept}"] * 65), "the limit is 64"),
    (dict(erase_scale=-1.0), "erase_scale must be a finite number >= 0"),
    (dict(preserve_scale=float("nan")), "preserve_scale must be a finite number >= 0"),
    (dict(push=float("inf")), "push must be a finite number >= 0"),
    (dict(lamb=0.0), "lamb must be a finite number > 0"),
    (dict(preserve=["square", " Circle "]), "preserve contains 'Circle', a concept being erased"),
    (dict(preserve=[f"p{i}" for i in range(513)]), "the limit is 512"),
    (dict(rounds=11), "rounds must be an integer from 0 to 10"),
    (dict(anchor="shape", guide="square"), "give one of them"),
])
def test_bad_input_is_refused_in_one_line(kw, message):
    with pytest.raises(EraseError, match=message) as err:
        EraseConfig(["circle"], method="uce", **kw).resolve()
    assert "\n" not in str(err.value)


def test_closed_form_settings_are_refused_for_esd_and_resolved_for_uce():
    with pytest.raises(EraseError, match="lamb applies to closed-form methods"):
        EraseConfig(["circle"], method="esd-x", lamb=0.2).validate()
    # the prompt settings serve both kinds: an ESD run given them erases in templates and holds a retain set
    prompted = EraseConfig(["circle"], method="esd-u", preserve=["square"]).resolve()
    assert prompted.prompted and (prompted.guide, prompted.preserve_scale) == ("", 1.0)
    assert prompted.used()["preserve"] == ["square"] and "lamb" not in prompted.used()
    base = {"*": {"sample_steps": 10, "lamb": 0.2}, "uce": {"templates": ["a {concept}"], "iterations": 7},
            "uce-robust": {"preserve_scale": 3.0}}
    cfg = EraseConfig(["circle"], method="uce", anchor="shape").resolve(base)
    assert (cfg.templates, cfg.lamb, cfg.rounds, cfg.guide, cfg.erase_scale) == (["a {concept}"], 0.2, 0, "shape", 1.0)
    assert cfg.iterations is None and cfg.sample_steps is None
    robust = EraseConfig(["circle"], method="uce-robust").resolve(base)
    assert (robust.rounds, robust.preserve_scale, robust.guide) == (2, 3.0, "")
    assert uce.prompts(EraseConfig(["circle"], method="uce", templates=["a {concept} in red"], preserve=["square"])
                       .resolve()) == ([("a circle in red", "a in red", "circle")],
                                       [("a square in red", "a square in red", "square")])
    esd = EraseConfig(["circle"], method="esd-x").resolve(base)
    assert esd.templates is None and esd.lamb is None and "templates" not in esd.used()


def test_stacked_edit_carries_the_parents_tensors(tiny_sd):
    parent = erase(load_pipeline(tiny_sd), EraseConfig(["square"], method="selfattn", iterations=1, ddim_steps=2,
                                                       lr=1e-3), progress=False)
    pipe = load_pipeline(tiny_sd)
    second = erase(pipe, EraseConfig(["circle"], method="uce"), parent=parent, progress=False)
    assert set(parent.tensors) < set(second.tensors)
    assert all(torch.equal(parent.tensors[k], second.tensors[k]) for k in parent.tensors)
    assert second.manifest["all_concepts"] == ["circle", "square"]
    assert [e["method"] for e in second.manifest["erasures"]] == ["selfattn", "uce"]
    fresh = load_pipeline(tiny_sd)
    delta_lib.apply(fresh.unet, second)
    assert_same_unet(fresh.unet, pipe.unet)


def test_stacked_closed_form_edits_are_solved_together_from_the_base(tiny_sd):
    """Closed-form takedowns stack by one joint solve from the base weights, never by composing solves: circle then
    square equals erasing both at once, and the lineage's records keep what each erasure was given."""
    first = erase(load_pipeline(tiny_sd), EraseConfig(["circle"], method="uce", preserve=["triangle"]),
                  progress=False)
    stacked = erase(load_pipeline(tiny_sd), EraseConfig(["square"], method="uce", preserve=["triangle"]),
                    parent=first, progress=False)
    both = erase(load_pipeline(tiny_sd), EraseConfig(["circle", "square"], method="uce", preserve=["triangle"]),
                 progress=False)
    assert stacked.tensors.keys() == both.tensors.keys()
    assert all(torch.allclose(stacked.tensors[k], both.tensors[k], atol=1e-6) for k in both.tensors)
    again = erase(load_pipeline(tiny_sd), EraseConfig(["square"], method="uce", preserve=["triangle"]),
                     parent=first, progress=False)
    assert all(torch.equal(again.tensors[k], stacked.tensors[k]) for k in stacked.tensors)   # deterministic
    records = stacked.manifest["erasures"]
    assert [(e["concepts"], e["hyperparameters"]["preserve"]) for e in records] == [(["circle"], ["triangle"]),
                                                                                    (["square"], ["triangle"])]


def test_the_preservation_is_held_in_proportion_to_the_concepts_erased(tiny_sd):
    """One concept's erase sums against the preserve set, as UCE weighs them; two concepts solved together (a stack or
    one takedown of both) hold the same preserve prompts twice as strongly, and the erase sums are the two added."""
    pipe = load_pipeline(tiny_sd)
    d = pipe.text_encoder.config.hidden_size
    configs = [EraseConfig([c], method="uce", preserve=["triangle"]).resolve() for c in ("circle", "square")]
    (one, kept), (other, _) = (uce.terms(pipe, [cfg], d) for cfg in configs)
    both, kept_both = uce.terms(pipe, configs, d)
    assert torch.linalg.matrix_norm(kept) > 0
    assert torch.allclose(kept_both, 2 * kept) and torch.allclose(both.cc, one.cc + other.cc)


def test_a_trained_erasure_beside_the_projections_does_not_stop_the_joint_solve(tiny_sd):
    """An ESD-u erasure between two closed-form ones (a shape between two artists) leaves the key/value projections
    alone, so the second closed-form erasure still solves both from the base and the ESD-u tensors stay as trained;
    an erasure that trained the projections makes the next edit start from its weights."""
    first = erase(load_pipeline(tiny_sd), EraseConfig(["circle"], method="uce", preserve=["triangle"]),
                  progress=False)
    trained = erase(load_pipeline(tiny_sd), EraseConfig(["triangle"], method="esd-u", iterations=1, ddim_steps=2,
                                                        lr=1e-3), parent=first, progress=False)
    stacked = erase(load_pipeline(tiny_sd), EraseConfig(["square"], method="uce", preserve=["triangle"]),
                    parent=trained, progress=False)
    both = erase(load_pipeline(tiny_sd), EraseConfig(["circle", "square"], method="uce", preserve=["triangle"]),
                 progress=False)
    assert set(both.tensors) < set(stacked.tensors)
    assert all(torch.allclose(stacked.tensors[k], both.tensors[k], atol=1e-6) for k in both.tensors)
    moved = [k for k in trained.tensors if k not in first.tensors]
    assert moved and all(torch.equal(stacked.tensors[k], trained.tensors[k]) for k in moved)
    on_kv = erase(load_pipeline(tiny_sd), EraseConfig(["triangle"], method="esd-x-strict", iterations=1,
                                                      ddim_steps=2, lr=1e-3), parent=first, progress=False)
    composed = erase(load_pipeline(tiny_sd), EraseConfig(["square"], method="uce", preserve=["triangle"]),
                     parent=on_kv, progress=False)
    assert not all(torch.allclose(composed.tensors[k], both.tensors[k], atol=1e-6) for k in both.tensors)


def test_delta_is_kept_in_the_bases_storage_dtype(tmp_path):
    from tests.conftest import build_tiny_sd

    half = build_tiny_sd(tmp_path / "half", dtype=torch.float16)
    pipe = load_pipeline(half)                      # solved in float64 from float16 weights
    d = erase(pipe, EraseConfig(["circle"], method="uce-robust"), progress=False)
    assert {t.dtype for t in d.tensors.values()} == {torch.float16} and d.manifest["dtype"] == "float16"
    fresh = load_pipeline(half)
    delta_lib.apply(fresh.unet, d)
    assert_same_unet(fresh.unet, pipe.unet)


def test_align_concept_also_edits_the_concepts_own_tokens(tiny_sd):
    """A concept at the start of a prompt: UCE's own alignment (final word on) never targets its token; with
    align="concept" that token's keys/values land on the guide's token at the same position."""
    template = ["{concept} on a table"]
    old = weights(dict(load_pipeline(tiny_sd).unet.named_parameters()))
    pipe = load_pipeline(tiny_sd)
    c, g = uce.aligned(pipe, [("circle on a table", "on a table", "circle")], concept_tokens=True)
    plain, _ = uce.aligned(pipe, [("circle on a table", "on a table")])
    assert len(c) > len(plain)             # the concept's token rows come on top of UCE's
    c1, g1 = c[-1:], g[-1:]
    errors = {}
    for align in ("final", "concept"):
        new = weights(erase(load_pipeline(tiny_sd), EraseConfig(["circle"], method="uce", templates=template,
                                                                align=align), progress=False).tensors)
        errors[align] = error(new, old, c1, g1)
    assert errors["concept"] < errors["final"] / 5


ADV = dict(method="uce-tokens-adv", attack_steps=3, templates=["a red {concept}", "a {concept} on a table"],
           preserve=["square"])


def test_adversarial_rounds_erase_the_soft_tokens_they_learn_and_record_them(tiny_sd):
    """uce-tokens-adv: each round inverts what the model drew of the concept on its own edit, and the token found is
    mapped onto the guide as the concept is (its keys/values far nearer the guide's than after uce-tokens alone);
    only the key/value weights change; the same seed gives the same delta; the tokens are in the manifest, and the
    edit solved again from them (as a lineage does) is the same edit, learning nothing."""
    from esd import inversion

    pipe = load_pipeline(tiny_sd)
    old = weights(dict(pipe.unet.named_parameters()))
    adv = erase(pipe, EraseConfig(["circle"], **ADV), progress=False)
    hp = adv.manifest["hyperparameters"]
    tokens = hp["soft_tokens"]["circle"]
    assert hp["attack_rounds"] == 2 and len(tokens) == 2
    assert all(len(v) == pipe.text_encoder.config.hidden_size for v in tokens) and tokens[0] != tokens[1]
    assert set(adv.tensors) == {n for n, _ in pipe.unet.named_parameters() if kv(n)}
    again = erase(load_pipeline(tiny_sd), EraseConfig(["circle"], **ADV), progress=False)
    assert again.manifest["tensors_sha256"] == adv.manifest["tensors_sha256"]
    assert again.manifest["hyperparameters"]["soft_tokens"] == hp["soft_tokens"]

    plain = weights(erase(load_pipeline(tiny_sd), EraseConfig(["circle"], **(ADV | {"attack_rounds": 0})),
                          progress=False).tensors)
    edited = weights(adv.tensors)
    for v in tokens:
        with inversion.soft_token(pipe, torch.tensor(v)):
            c, g = uce.aligned(pipe, [("a red cat", "a red", "cat"), ("a cat on a table", "a on a table", "cat")],
                               concept_tokens=True)
        assert error(edited, old, c, g) < 0.5 * error(plain, old, c, g)

    replay = EraseConfig(["circle"], **ADV, soft_tokens=hp["soft_tokens"])
    replayed = erase(load_pipeline(tiny_sd), replay, progress=False)
    assert replayed.manifest["tensors_sha256"] == adv.manifest["tensors_sha256"]
    [config] = uce.lineage_configs(adv, list(adv.tensors))
    assert config.soft_tokens == hp["soft_tokens"] and config.method == "uce-tokens-adv"


def test_a_takedown_over_an_adversarial_edit_solves_it_again_from_its_recorded_tokens(tiny_sd):
    """The lineage's joint solve replays the parent's soft tokens: circle (adversarial) then square (uce) is the same
    as solving both from the base with circle's recorded tokens; without them it is not."""
    first = erase(load_pipeline(tiny_sd), EraseConfig(["circle"], **ADV), progress=False)
    stacked = erase(load_pipeline(tiny_sd), EraseConfig(["square"], method="uce", preserve=["triangle"]),
                    parent=first, progress=False)
    assert stacked.manifest["erasures"][0]["hyperparameters"]["soft_tokens"] == \
        first.manifest["hyperparameters"]["soft_tokens"]
    pipe = load_pipeline(tiny_sd)
    d = pipe.text_encoder.config.hidden_size
    configs = uce.lineage_configs(stacked, list(first.tensors))
    with_tokens, _ = uce.terms(pipe, configs, d)
    configs[0].soft_tokens = None
    without, _ = uce.terms(pipe, configs, d)
    assert not torch.allclose(with_tokens.cc, without.cc)
    again = erase(load_pipeline(tiny_sd), EraseConfig(["square"], method="uce", preserve=["triangle"]),
                  parent=first, progress=False)
    assert again.manifest["tensors_sha256"] == stacked.manifest["tensors_sha256"]


@pytest.mark.parametrize("kw, message", [
    (dict(attack_rounds=11), "attack_rounds must be an integer from 0 to 10"),
    (dict(attack_steps=0), "attack_steps must be an integer from 1 to 1000"),
    (dict(soft_tokens={"square": [[0.1]]}), "soft_tokens must map each erased concept"),
    (dict(soft_tokens={"circle": [[float("nan")]]}), "soft_tokens must map each erased concept"),
])
def test_bad_adversarial_settings_are_refused_in_one_line(kw, message):
    with pytest.raises(EraseError, match=message) as err:
        EraseConfig(["circle"], method="uce-tokens-adv", **kw).resolve()
    assert "\n" not in str(err.value)


def test_a_request_cannot_give_soft_tokens_and_sdxl_is_refused_before_any_work(tmp_path):
    with pytest.raises(EraseError, match="'soft_tokens' is recorded by an erasure, not a setting"):
        EraseConfig.with_overrides(["circle"], "uce-tokens-adv", {"soft_tokens": {"circle": [[0.0]]}})
    from tests.conftest import build_tiny_sd

    pipe = load_pipeline(build_tiny_sd(tmp_path, arch="sdxl"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(EraseError, match="uce-tokens-adv: textual inversion here supports pipelines with one text"):
        erase(pipe, EraseConfig(["circle"], method="uce-tokens-adv"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


COMBINED = dict(method="uce-tokens-esd", iterations=3, ddim_steps=4, lr=1e-3, templates=["a red {concept}"],
                preserve=["square"])


@pytest.mark.parametrize("method,part", [("uce-tokens-esd", "esd-u-retain"), ("uce-tokens-xout", "esd-xout-retain")])
def test_the_combined_method_trains_then_edits_one_delta_same_seed_same_delta(tiny_sd, method, part):
    """A combination: its trained part (esd-u-retain: ESD-u's parameters; esd-xout-retain: the cross-attention output
    projections) and its closed-form part (uce-tokens: the key/value weights), both in one delta that rebuilds the
    model; the manifest names the combination and lists both parts, each with the settings it used; the same seed
    gives the same delta, another seed another."""
    from esd import methods

    combined = COMBINED | {"method": method}
    pipe = load_pipeline(tiny_sd)
    d = erase(pipe, EraseConfig(["circle"], **combined), progress=False)
    trainable = set(methods.select(pipe.unet, part))
    every_kv = {n for n, _ in pipe.unet.named_parameters() if kv(n)}
    assert every_kv <= set(d.tensors) <= trainable | every_kv and set(d.tensors) & trainable
    assert d.manifest["method"] == method
    trained, edited = d.manifest["erasures"]
    assert (trained["method"], edited["method"]) == (part, "uce-tokens")
    assert trained["hyperparameters"]["iterations"] == 3 and "push" not in trained["hyperparameters"]
    assert edited["hyperparameters"]["align"] == "concept" and "iterations" not in edited["hyperparameters"]
    assert trained["hyperparameters"]["templates"] == edited["hyperparameters"]["templates"] == ["a red {concept}"]
    fresh = load_pipeline(tiny_sd)
    delta_lib.apply(fresh.unet, d)
    assert_same_unet(fresh.unet, pipe.unet)
    # the trained part alone, then uce-tokens over it as its parent: the same tensors
    alone = erase(load_pipeline(tiny_sd), EraseConfig(["circle"], **(COMBINED | {"method": part})), progress=False)
    over = erase(load_pipeline(tiny_sd), EraseConfig(["circle"], method="uce-tokens", templates=["a red {concept}"],
                                                     preserve=["square"]), parent=alone, progress=False)
    assert over.manifest["tensors_sha256"] == d.manifest["tensors_sha256"]
    again = erase(load_pipeline(tiny_sd), EraseConfig(["circle"], **combined), progress=False)
    other = erase(load_pipeline(tiny_sd), EraseConfig(["circle"], **combined, seed=1), progress=False)
    assert again.manifest["tensors_sha256"] == d.manifest["tensors_sha256"] != other.manifest["tensors_sha256"]


@pytest.mark.parametrize("method,part", [("uce-tokens-esd", "esd-u-retain"), ("uce-tokens-xout", "esd-xout-retain")])
def test_a_closed_form_takedown_over_a_combined_one_resolves_both_edits_and_keeps_the_trained_weights(tiny_sd, method,
                                                                                                     part):
    first = erase(load_pipeline(tiny_sd), EraseConfig(["circle"], **(COMBINED | {"method": method})), progress=False)
    second = erase(load_pipeline(tiny_sd), EraseConfig(["square"], method="uce-tokens", templates=["a red {concept}"]),
                   parent=first, progress=False)
    trained = {n for n in first.tensors if not kv(n)}
    assert trained and all(torch.equal(second.tensors[n], first.tensors[n]) for n in trained)
    assert [e["method"] for e in second.manifest["erasures"]] == [part, "uce-tokens", "uce-tokens"]
    assert second.manifest["all_concepts"] == ["circle", "square"]
    # solved together from the base: not the same as the second edit composed on the first one's weights
    assert any(not torch.equal(second.tensors[n], first.tensors[n]) for n in first.tensors if kv(n))


def test_a_combined_method_takes_both_kinds_of_setting_and_checks_them():
    cfg = EraseConfig(["circle"], method="uce-tokens-esd", iterations=5, eta=2.0, push=0.5, lamb=0.2).validate()
    assert {"iterations", "eta", "push", "lamb"} <= set(cfg.used())
    with pytest.raises(EraseError, match="lamb must be a finite number > 0"):
        EraseConfig(["circle"], method="uce-tokens-esd", lamb=0.0).validate()
    with pytest.raises(EraseError, match="iterations must be a positive integer"):
        EraseConfig(["circle"], method="uce-tokens-esd", iterations=0).validate()
