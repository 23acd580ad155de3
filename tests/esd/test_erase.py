import pytest
import torch
from typer.testing import CliRunner

from esd import methods
from esd.cli import app
from esd.erase import EraseConfig, EraseError, Eraser, erase, esd_target
from esd.models import Cond, load_pipeline


def test_target_formula_against_hand_computed_values():
    eps_0 = torch.tensor([1.0, 2.0, -1.0])
    eps_c = torch.tensor([3.0, 1.0, -1.0])
    # eps_0 - eta * (eps_c - eps_0) with eta 2: [1 - 4, 2 + 2, -1 - 0]
    assert torch.equal(esd_target(eps_0, eps_c, 2.0), torch.tensor([-3.0, 4.0, -1.0]))
    # an anchor replaces the first eps_0 only: [0.5 - 2, 0 + 1, 1 - 0]
    eps_a = torch.tensor([0.5, 0.0, 1.0])
    assert torch.equal(esd_target(eps_0, eps_c, 1.0, eps_a), torch.tensor([-1.5, 1.0, 1.0]))


def tiny_cfg(**kw):
    base = dict(concepts=["circle"], method="esd-x", iterations=3, ddim_steps=4, lr=1e-3, seed=0)
    base.update(kw)
    return EraseConfig(**base)


def test_same_seed_same_delta_and_another_seed_differs(tiny_sd):
    a = erase(load_pipeline(tiny_sd), tiny_cfg(), progress=False)
    b = erase(load_pipeline(tiny_sd), tiny_cfg(), progress=False)
    c = erase(load_pipeline(tiny_sd), tiny_cfg(seed=1), progress=False)
    assert a.manifest["tensors_sha256"] == b.manifest["tensors_sha256"]
    assert a.manifest["tensors_sha256"] != c.manifest["tensors_sha256"]


def test_only_the_methods_parameters_change(tiny_sd):
    pipe = load_pipeline(tiny_sd)
    d = erase(pipe, tiny_cfg(method="esd-x-strict"), progress=False)
    assert d.tensors and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in d.tensors)


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_and_reference_compute_the_same_loss(tiny_sd, batch):
    for anchor in (None, "square"):
        losses = []
        for mode in ("reference", "fast"):
            eraser = Eraser(load_pipeline(tiny_sd), tiny_cfg(mode=mode, anchor=anchor, batch=batch))
            losses.append(eraser.step())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-7)


RETAIN = dict(method="esd-u-retain", templates=[["a red {concept}", "a red shape"], "a {concept} by the sea"],
              preserve=["square", "triangle"])


def test_a_retain_run_changes_only_its_rows_parameters_same_seed_same_delta(tiny_sd):
    a = erase(load_pipeline(tiny_sd), tiny_cfg(**RETAIN), progress=False)
    b = erase(load_pipeline(tiny_sd), tiny_cfg(**RETAIN), progress=False)
    c = erase(load_pipeline(tiny_sd), tiny_cfg(**RETAIN, seed=1), progress=False)
    assert a.manifest["tensors_sha256"] == b.manifest["tensors_sha256"] != c.manifest["tensors_sha256"]
    u = set(methods.select(load_pipeline(tiny_sd).unet, "esd-u"))
    assert a.tensors and set(a.tensors) <= u
    assert a.manifest["hyperparameters"]["preserve"] == ["square", "triangle"]


def test_a_retain_run_uses_its_templates_guides_and_preserve_prompts(tiny_sd):
    eraser = Eraser(load_pipeline(tiny_sd), tiny_cfg(**RETAIN))
    assert [p[:2] for p in eraser.pairs] == [("a red circle", "a red shape"), ("a circle by the sea", "a by the sea")]
    assert eraser.keep == ["a red square", "a square by the sea", "a red triangle", "a triangle by the sea"]
    assert set(eraser.embeddings) == {"", "a red circle", "a red shape", "a circle by the sea", "a by the sea"} | set(
        eraser.keep)
    # preserve_scale 0 drops the retain term: only the erase prompts are trained
    assert Eraser(load_pipeline(tiny_sd), tiny_cfg(**RETAIN, preserve_scale=0.0)).keep == []


def test_the_retain_loss_holds_the_preserve_prompts_closer_than_plain_esd_u():
    from esd.models import conditioning
    from esd.toy import BASE_DIR

    def drift(**kw):
        pipe = load_pipeline(BASE_DIR)
        x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        cond = conditioning(pipe, ["a red square", "a blue triangle", "a picture of a green square", "a yellow triangle"])
        with torch.no_grad():
            before = pipe.unet(x, 500, encoder_hidden_states=cond.hidden).sample
        erase(pipe, EraseConfig(["circle"], concept_kind="object", iterations=20, lr=1e-4, **kw), progress=False)
        with torch.no_grad():
            return (pipe.unet(x, 500, encoder_hidden_states=cond.hidden).sample - before).pow(2).mean().item()

    # the toy's defaults for esd-u-retain: its object templates and the preservation shapes square and triangle
    plain = drift(method="esd-u", templates=[["a red {concept}", "a red shape"]])
    held = drift(method="esd-u-retain")
    assert 0 < held < 0.2 * plain, (held, plain)


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_and_reference_compute_the_same_retain_loss(tiny_sd, batch):
    losses = [Eraser(load_pipeline(tiny_sd), tiny_cfg(mode=mode, batch=batch, **RETAIN)).step()
              for mode in ("reference", "fast")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-7)


def test_a_batched_step_draws_its_prompts_and_noise_per_draw_at_one_timestep(tiny_sd, monkeypatch):
    """batch 3: three erase prompts with their guides and three preserve prompts per step, three x_t sampled together,
    every prediction at one timestep; the run records its batch and differs from one draw per step."""
    eraser = Eraser(load_pipeline(tiny_sd), tiny_cfg(batch=3, **RETAIN))
    seen, calls = [], []
    conds, unet = eraser._conds, eraser.unet.forward
    monkeypatch.setattr(eraser, "_conds", lambda prompts: seen.append(prompts) or conds(prompts))
    monkeypatch.setattr(eraser.unet, "forward", lambda x, t, **kw: calls.append((x.shape[0], int(t))) or unet(x, t, **kw))
    eraser.step()
    (prompts,) = seen
    pairs, keep = {p[:2] for p in eraser.pairs}, set(eraser.keep)
    assert prompts[0] == "" and len(prompts) == 10
    assert {(c, g) for c, g in zip(prompts[1:4], prompts[4:7])} <= pairs and set(prompts[7:]) <= keep
    # the sampling of x_t (3 noises, unconditional and conditional), the frozen predictions (erase, guide and preserve
    # prompts) and the trained ones (erase and preserve prompts), the last two at one timestep
    *sampling, frozen, trained = calls
    assert all(b == 6 for b, _ in sampling) and frozen == (9, trained[1]) and trained[0] == 6
    a = erase(load_pipeline(tiny_sd), tiny_cfg(batch=3, **RETAIN), progress=False)
    assert a.manifest["hyperparameters"]["batch"] == 3
    one = erase(load_pipeline(tiny_sd), tiny_cfg(**RETAIN), progress=False)
    assert one.manifest["hyperparameters"]["batch"] == 1
    assert a.manifest["tensors_sha256"] != one.manifest["tensors_sha256"]


def test_retain_mix_holds_points_between_the_preserve_prompts_and_is_recorded(tiny_sd):
    """retain_mix: each held conditioning lies on the segment from its preserve prompt toward another preserve prompt
    or the empty prompt, at most retain_mix of the way; the run records it and differs from one without."""
    eraser = Eraser(load_pipeline(tiny_sd), tiny_cfg(batch=8, retain_mix=0.5, **RETAIN))
    held = {p: eraser.embeddings[p].hidden[0] for p in eraser.keep + [""]}
    kept = eraser.keep[1]
    emb_0 = eraser.embeddings[""]
    mixed = eraser._mixed(Cond.cat([eraser.embeddings[kept]] * 8), emb_0).hidden
    a, moved = held[kept], 0
    for row in mixed:
        fits = []
        for partner, b in held.items():
            if partner == kept:
                continue
            w = ((row - a) * (b - a)).sum() / (b - a).pow(2).sum()
            if torch.allclose(a + w * (b - a), row, atol=1e-5):
                fits.append(float(w))
        assert fits and all(0 <= w <= 0.5 + 1e-6 for w in fits), fits
        moved += not torch.allclose(row, a)
    assert moved >= 6
    a = erase(load_pipeline(tiny_sd), tiny_cfg(retain_mix=0.5, **RETAIN), progress=False)
    b = erase(load_pipeline(tiny_sd), tiny_cfg(retain_mix=0.5, **RETAIN), progress=False)
    plain = erase(load_pipeline(tiny_sd), tiny_cfg(**RETAIN), progress=False)
    assert a.manifest["hyperparameters"]["retain_mix"] == 0.5
    assert a.manifest["tensors_sha256"] == b.manifest["tensors_sha256"] != plain.manifest["tensors_sha256"]
    assert "retain_mix" not in erase(load_pipeline(tiny_sd), tiny_cfg(), progress=False).manifest["hyperparameters"]


def test_hold_guides_holds_the_guide_prompts_beside_the_preserve_prompts_and_is_recorded(tiny_sd):
    """hold_guides: the retain loss draws the guide prompts ("a red shape") as well as the preserve prompts; the erase
    prompts are never held; the run records it and differs from one without."""
    without = Eraser(load_pipeline(tiny_sd), tiny_cfg(**RETAIN))
    held = Eraser(load_pipeline(tiny_sd), tiny_cfg(hold_guides=True, **RETAIN))
    assert "a red shape" not in without.keep and "a red shape" in held.keep
    assert set(without.keep) < set(held.keep)
    assert not {p for p, _, _ in held.pairs} & set(held.keep)
    a = erase(load_pipeline(tiny_sd), tiny_cfg(hold_guides=True, **RETAIN), progress=False)
    plain = erase(load_pipeline(tiny_sd), tiny_cfg(**RETAIN), progress=False)
    assert a.manifest["hyperparameters"]["hold_guides"] is True
    assert a.manifest["tensors_sha256"] != plain.manifest["tensors_sha256"]
    assert "hold_guides" not in erase(load_pipeline(tiny_sd), tiny_cfg(), progress=False).manifest["hyperparameters"]


def test_rank_changes_each_trained_weight_by_a_low_rank_product_and_is_recorded(tiny_sd):
    """rank r: every trained weight's change (a kernel flattened per output channel) has rank at most r, biases and
    norms change in full, only the row's parameters move, the same seed gives the same delta, the manifest records it,
    and the UNet left behind holds plain parameters again."""
    pipe = load_pipeline(tiny_sd)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    a = erase(pipe, tiny_cfg(rank=2, lr=1e-2, **RETAIN), progress=False)
    b = erase(load_pipeline(tiny_sd), tiny_cfg(rank=2, lr=1e-2, **RETAIN), progress=False)
    full = erase(load_pipeline(tiny_sd), tiny_cfg(lr=1e-2, **RETAIN), progress=False)
    assert a.manifest["tensors_sha256"] == b.manifest["tensors_sha256"] != full.manifest["tensors_sha256"]
    assert a.manifest["hyperparameters"]["rank"] == 2
    assert set(a.tensors) <= set(methods.select(load_pipeline(tiny_sd).unet, "esd-u"))
    assert not any("parametrizations" in n for n, _ in pipe.unet.named_parameters())
    weights = biases = 0
    for name, value in a.tensors.items():
        change = (value.float() - base[name].float()).reshape(value.shape[0], -1) if value.dim() > 1 else None
        if change is None:
            biases += not torch.equal(value.float(), base[name].float())
            continue
        assert torch.linalg.matrix_rank(change, rtol=1e-3) <= 2, name
        weights += bool(change.abs().max() > 0)
    assert weights >= 10 and biases >= 1
    assert max(torch.linalg.matrix_rank((full.tensors[n].float() - base[n].float()).reshape(full.tensors[n].shape[0], -1),
                                        rtol=1e-3) for n in full.tensors if full.tensors[n].dim() > 1) > 2


@pytest.mark.parametrize("batch", [1, 2])
def test_fast_and_reference_compute_the_same_low_rank_loss(tiny_sd, batch):
    losses = []
    for mode in ("reference", "fast"):
        eraser = Eraser(load_pipeline(tiny_sd), tiny_cfg(mode=mode, rank=2, batch=batch, **RETAIN))
        losses += [eraser.step(), eraser.step()]
    assert losses[:2] == pytest.approx(losses[2:], rel=1e-4, abs=1e-7)


def test_fast_mode_holds_no_second_unet(tiny_sd):
    pipe = load_pipeline(tiny_sd)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    fast = Eraser(pipe, tiny_cfg(mode="fast", method="esd-x"))
    held = sum(t.numel() for t in fast.original.values())
    assert fast.frozen is None and held < 0.5 * unet_params
    assert held == sum(p.numel() for n, p in pipe.unet.named_parameters() if ".attn2." in n)
    ref = Eraser(load_pipeline(tiny_sd), tiny_cfg(mode="reference"))
    assert sum(p.numel() for p in ref.frozen.parameters()) == unet_params


@pytest.mark.parametrize("kw, message", [
    (dict(method="esd-q"), "unknown method"),
    (dict(concepts=[""]), "concept is empty"),
    (dict(concepts=["x" * 201]), "limit is 200"),
    (dict(concepts=["circle\x07"]), "control characters"),
    (dict(iterations=0), "iterations must be a positive integer"),
    (dict(eta=0.0), "eta must be > 0"),
    (dict(eta=-1.0), "eta must be > 0"),
    (dict(eta="3"), "eta must be > 0"),
    (dict(lr=float("inf")), "lr must be > 0"),
    (dict(guidance="3"), "guidance must be >= 0"),
    (dict(guidance=float("nan")), "guidance must be >= 0"),
    (dict(sample_steps=1.5), "sample_steps must be a positive integer"),
    (dict(concepts=[]), "no concept"),
    (dict(iterations=10 ** 9), "iterations is 1000000000; the limit is 100000"),
    (dict(iterations=True), "iterations must be a positive integer"),
    (dict(ddim_steps=5000), "ddim_steps is 5000; the limit is 1000"),
    (dict(batch=0), "batch must be a positive integer"),
    (dict(batch=2.5), "batch must be a positive integer"),
    (dict(batch=65), "batch is 65; the limit is 64"),
    (dict(retain_mix=1.5), "retain_mix must be a number from 0 to 1"),
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=2000), "rank is 2000; the limit is 1024"),
    (dict(retain_mix=-0.1), "retain_mix must be a number from 0 to 1"),
    (dict(retain_mix=float("nan")), "retain_mix must be a number from 0 to 1"),
    (dict(hold_guides="yes"), "hold_guides must be true or false"),
])
def test_bad_input_is_refused(kw, message):
    with pytest.raises((EraseError, ValueError), match=message):
        tiny_cfg(**kw).validate()


@pytest.mark.parametrize("args, message", [
    (["erase", "circle", "--method", "esd-q"], "unknown method 'esd-q'"),
    (["erase", ""], "concept is empty"),
    (["erase", "y" * 201], "limit is 200"),
    (["erase", "red\ncircle"], "control characters"),
    (["erase", "circle", "--iterations", "0"], "iterations must be a positive integer"),
    (["erase", "circle", "--eta", "0"], "eta must be > 0"),
    (["erase", "circle", "--rank", "0"], "rank must be a positive integer"),
    (["erase", "circle", "--base", "/nonexistent/sd"], "model folder not found: /nonexistent/sd"),
])
def test_cli_bad_input_one_line_and_nothing_written(tmp_path, args, message):
    out = tmp_path / "delta"
    result = CliRunner().invoke(app, args + ["--out", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
    assert not out.exists()


def test_missing_part_of_a_model_folder_is_named(tiny_sd, tmp_path):
    import shutil
    broken = tmp_path / "sd"
    shutil.copytree(tiny_sd, broken)
    (broken / "unet" / "config.json").unlink()
    from esd.models import ModelError
    with pytest.raises(ModelError, match="missing unet/config.json"):
        load_pipeline(broken)


@pytest.mark.parametrize("overrides, message", [
    ({"iterationz": 5}, "unknown erase setting 'iterationz'"),
    ({"concepts": ["circle"]}, "unknown erase setting 'concepts'"),
    ({"iterations": -1}, "iterations must be a positive integer"),
    ({"push": float("nan")}, "push"),
    ([("iterations", 5)], "erase settings must be a mapping"),
])
def test_settings_given_as_a_mapping_are_checked_before_any_work(overrides, message):
    with pytest.raises(EraseError, match=message):
        EraseConfig.with_overrides(["Vela Moreau"], "uce", overrides)
    assert EraseConfig.with_overrides(["Vela Moreau"], "esd-x", {"iterations": 5}).iterations == 5


def test_v_prediction_outputs_become_the_noise_they_imply():
    from diffusers import DDIMScheduler

    from esd.models import as_noise

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for t in (1, 500, 999):
        ts = torch.tensor([t, t])
        x_t = sched.add_noise(x0, noise, ts)
        v = sched.get_velocity(x0, noise, ts)
        assert torch.allclose(as_noise(v, x_t, sched.alphas_cumprod[t], "v_prediction"), noise, atol=1e-4)
        assert torch.equal(as_noise(noise, x_t, sched.alphas_cumprod[t], "epsilon"), noise)


def _with_prediction(folder, tmp_path, prediction: str):
    import json
    import shutil

    out = tmp_path / prediction
    shutil.copytree(folder, out)
    path = out / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prediction_type": prediction}))
    return out


def test_a_v_prediction_base_is_erased_in_noise_space_and_says_so(tiny_sd, tmp_path):
    v_base = _with_prediction(tiny_sd, tmp_path, "v_prediction")
    eps_delta = erase(load_pipeline(tiny_sd), tiny_cfg(), progress=False)
    v_delta = erase(load_pipeline(v_base), tiny_cfg(), progress=False)
    assert eps_delta.manifest["prediction_type"] == "epsilon" and v_delta.manifest["prediction_type"] == "v_prediction"
    # the same weights, read as predicting v, give other noise predictions: another erasure
    assert v_delta.manifest["tensors_sha256"] != eps_delta.manifest["tensors_sha256"]
    assert v_delta.manifest["final_loss"] is not None and v_delta.manifest["final_loss"] == v_delta.manifest["final_loss"]


def test_other_prediction_types_are_refused_at_load(tiny_sd, tmp_path):
    from esd.models import ModelError

    with pytest.raises(ModelError, match="predicts 'sample'.*supported: epsilon, v_prediction"):
        load_pipeline(_with_prediction(tiny_sd, tmp_path, "sample"))


def test_toy_tiny_builds_the_same_real_architecture_folder_for_the_same_seed(tmp_path):
    from esd.models import load_pipeline as load

    outs = [CliRunner().invoke(app, ["toy", "tiny", "--arch", "sd21-v", "--out", str(tmp_path / n)]) for n in "ab"]
    assert all(o.exit_code == 0 for o in outs), outs[0].output
    assert outs[0].output.split("sha256 ")[1] == outs[1].output.split("sha256 ")[1]
    pipe = load(tmp_path / "a")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection and list(pipe.unet.config.attention_head_dim) == [2, 4]
    again = CliRunner().invoke(app, ["toy", "tiny", "--out", str(tmp_path / "a")])
    assert again.exit_code == 2 and "exists" in again.output      # a usage error, nothing overwritten
