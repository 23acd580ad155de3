"""The speed benchmark's measurement on the committed toy base: both modes, the sampling option honoured."""

import pytest

from esd.bench import speed_run


def test_speed_run_measures_each_mode_with_its_sampling():
    reference = speed_run("toy", "esd-x", "reference", iterations=1)
    fast = speed_run("toy", "esd-x", "fast", iterations=1)
    longer = speed_run("toy", "esd-x", "fast", iterations=1, sample_steps=20)
    for run in (reference, fast, longer):
        assert run["s_per_it"] > 0 and run["peak_bytes"] > 0 and run["device"] == "cpu"
    # the reference samples x_t with every DDIM step; fast takes the toy's default jumps unless told otherwise
    assert reference["sample_steps"] is None and fast["sample_steps"] == 10 and longer["sample_steps"] == 20


def test_quality_runs_pair_default_with_each_kind_and_refuse_unknown_names():
    import pytest

    from esd.bench import quality_concepts, quality_runs
    from esd.methods import DEFAULT_BY_KIND, MethodError

    assert quality_runs(["default"], ["Vela Moreau", "circle"]) == [(DEFAULT_BY_KIND["style"], "Vela Moreau"),
                                                                   (DEFAULT_BY_KIND["object"], "circle")]
    assert quality_runs(["uce", "esd-x"], ["circle"]) == [("uce", "circle"), ("esd-x", "circle")]
    with pytest.raises(MethodError):
        quality_runs(["no-such"], ["circle"])
    with pytest.raises(ValueError, match="no artist or shape"):
        quality_concepts(["circle", "red"])


def test_speed_configs_have_the_real_models_sizes():
    from esd.bench import speed_unet

    # parameter counts of Stable Diffusion 1.5's and SDXL base 1.0's UNets
    assert sum(p.numel() for p in speed_unet("sd15", "meta").parameters()) == 859_520_964
    assert sum(p.numel() for p in speed_unet("sdxl", "meta").parameters()) == 2_567_463_684


def test_speed_run_measures_the_sdxl_shaped_loop(monkeypatch):
    from esd import bench

    small = bench.UNET_SIZES["sdxl"] | {"sample_size": 8, "block_out_channels": (32, 64, 64),
                                        "transformer_layers_per_block": (1, 1, 1), "attention_head_dim": (2, 2, 2)}
    monkeypatch.setitem(bench.UNET_SIZES, "sdxl", small)
    for mode in ("reference", "fast"):
        run = speed_run("sdxl", "esd-x", mode, iterations=1)
        assert run["s_per_it"] > 0 and run["peak_bytes"] > 0 and run["config"] == "sdxl"


def test_erasure_seeds_default_to_zero_and_bad_ones_are_refused():
    import pytest

    from esd.bench import MAX_SEEDS, erase_seeds

    assert erase_seeds(None) == [0] and erase_seeds([2, 0, 1]) == [2, 0, 1]
    for bad, message in (([], "give 1 to"), (list(range(MAX_SEEDS + 1)), "give 1 to"), ([-1], "integer >= 0"),
                         ([True], "integer >= 0"), ([1, 1], "repeat")):
        with pytest.raises(ValueError, match=message):
            erase_seeds(bad)


def test_the_summary_averages_over_concepts_and_seeds_and_names_the_lowest_erasure():
    from esd.bench import summarize

    def row(concept, seed, ua):
        return {"kind": "object", "method": "esd-u-retain", "default": True, "concept": concept, "seed": seed,
                "ua": ua, "ua_se": 0.0, "ira": 1.0, "ira_se": 0.0, "cra": 1.0, "cra_se": 0.0, "attack_rate": None,
                "erase_seconds": 10.0 * (seed + 1), "eval_seconds": 5.0, "judge_agreement": 0.9}

    rows = [row("circle", 0, 1.0), row("circle", 1, 0.9), row("triangle", 0, 0.95), row("triangle", 1, 0.25)]
    (summary,) = summarize(rows)
    assert summary["concepts"] == 2 and summary["erasures"] == 4
    assert abs(summary["ua"] - 0.775) < 1e-12 and summary["lowest_ua"] == 0.25
    assert summary["erase_seconds"] == 15.0 and summary["attack_rate"] is None


def test_bench_quality_refuses_bad_seeds_in_one_line_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from esd.cli import app

    monkeypatch.setenv("ESD_HOME", str(tmp_path / "home"))
    for seeds, message in (("x", "--seeds takes comma-separated integers"), ("1,1", "erasure seeds repeat"),
                           ("-1", "integer >= 0")):
        result = CliRunner().invoke(app, ["bench", "quality", "--seeds", seeds, "--out", str(tmp_path / "out")])
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_benchmark_erasures_take_the_operators_settings_under_their_own(monkeypatch):
    from esd import erase_defaults
    from esd.bench import erase_config

    monkeypatch.setenv(erase_defaults.ENV, '{"esd-u-retain": {"batch": {"object": 4}, "sample_steps": {"object": 2}}}')
    operator = erase_defaults.load()
    shape = erase_config("triangle", "esd-u-retain", operator)
    assert (shape.batch, shape.sample_steps, shape.concept_kind) == (4, 2, "object")
    artist = erase_config("Vela Moreau", "esd-u-retain", operator)
    assert (artist.batch, artist.sample_steps, artist.concept_kind) == (None, None, "style")
    own = erase_config("triangle", "esd-u-retain", operator, {"batch": 2, "seed": 1})
    assert (own.batch, own.sample_steps, own.seed) == (2, 2, 1)
    assert erase_config("triangle", "esd-u-retain").batch is None


def test_bench_quality_refuses_bad_operator_settings_in_one_line_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from esd.cli import app

    monkeypatch.setenv("ESD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ESD_ERASE_DEFAULTS", '{"esd-u-retain": {"batch": {"object": 0}}}')
    result = CliRunner().invoke(app, ["bench", "quality", "--concepts", "triangle", "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "ESD_ERASE_DEFAULTS: esd-u-retain (object): batch" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "home" / "cache").exists()


def test_the_stack_erases_every_takedown_at_its_erasure_seed(monkeypatch):
    from esd import bench

    seen = []

    class Stop(Exception):
        pass

    def erase(pipe, cfg, parent=None, progress=False):
        seen.append((cfg.concepts, cfg.method, cfg.seed))
        if len(seen) == 2:
            raise Stop
        return None

    monkeypatch.setattr(bench, "erase", erase)
    with pytest.raises(Stop):
        bench.stack(bench.BASE_DIR, None, ["Vela Moreau", "circle", "Otto Kerr"], False, print, seed=2)
    assert seen == [(["Vela Moreau"], "uce-tokens-adv", 2), (["circle"], "esd-u-retain", 2)]


def test_stack_figures_on_a_hand_made_judged_set():
    """Known answers: the images naming an erased concept count only for its UA; each untouched class is read on the
    rest, its head's accuracy as IRA and the other heads' as CRA, beside the base's on the same images."""
    from esd.bench import stack_figures
    from esd.evaluate.toy import Judged

    truth = [("Vela Moreau", "square", "red"), ("Ines Calder", "circle", "blue"), ("Ines Calder", "square", "red"),
             ("Ines Calder", "heart", "green"), ("plain", "square", "red"), ("plain", "heart", "red")]
    pred = [("plain", "square", "red"), ("Ines Calder", "square", "blue"), ("plain", "square", "red"),
            ("Ines Calder", "heart", "blue"), ("plain", "square", "red"), ("plain", "heart", "red")]

    def judged(rows):
        return Judged([f"p{i}" for i in range(len(truth))],
                      {h: [t[k] for t in truth] for k, h in enumerate(("style", "shape", "color"))},
                      {h: [r[k] for r in rows] for k, h in enumerate(("style", "shape", "color"))}, None)

    out = stack_figures(judged(pred), judged(truth), ["Vela Moreau", "circle"])
    assert out["erased"]["Vela Moreau"]["ua"] == 1.0 and out["erased"]["circle"]["ua"] == 1.0
    u = out["untouched"]
    assert set(u) == {"Ines Calder", "plain", "square", "heart"}        # circle's and Vela Moreau's images left out
    assert (u["Ines Calder"]["ira"], u["Ines Calder"]["cra"], u["Ines Calder"]["images"]) == (0.5, 0.75, 2)
    assert (u["plain"]["ira"], u["plain"]["cra"]) == (1.0, 1.0)
    assert (u["square"]["ira"], u["square"]["cra"]) == (1.0, 0.75)
    assert (u["heart"]["ira"], u["heart"]["cra"]) == (1.0, 0.75)
    assert all(v["base_ira"] == v["base_cra"] == 1.0 for v in u.values())
    assert (out["lowest_untouched"], out["min_untouched_ira"], out["min_untouched_cra"]) == ("Ines Calder", 0.5, 0.75)
    assert out["lowest_erased"] == "Vela Moreau" and out["min_erased_ua"] == 1.0
