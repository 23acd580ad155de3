"""The speed benchmark's measurement on the committed toy base: both modes, the sampling option honoured."""

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
