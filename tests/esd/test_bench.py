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
