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
