"""The toy world: renderer, vocabulary, the committed judge and base, and the build on a reduced budget."""

import random
import re

import torch
from transformers import CLIPTokenizer

from esd.models import load_pipeline
from esd.toy import BASE_DIR, JUDGE_DIR, world
from esd.toy.judge import NONE, Judge, held_out_metrics


def test_render_is_deterministic_and_distinct():
    items = world.all_items()
    n = len(world.SHAPES) * len(world.COLORS) * len(world.STYLES)
    a = world.render(items, torch.Generator().manual_seed(3))
    b = world.render(items, torch.Generator().manual_seed(3))
    assert a.shape == (n, 3, 32, 32) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    # every pair of combinations looks different
    flat = a.flatten(1)
    dist = torch.cdist(flat, flat) + torch.eye(n) * 1e9
    assert dist.min() > 1.0


def test_look_alikes_differ_only_in_their_style():
    # same geometry, each artist against its look-alike: the pictures differ, and only a little
    gen = torch.Generator().manual_seed(5)
    for a, b in world.LOOK_ALIKES.items():
        items = [world.Item(0, 0, world.STYLES.index(a)), world.Item(0, 0, world.STYLES.index(b))]
        twin = torch.Generator().set_state(gen.get_state())
        x, y = world.render(items[:1], gen), world.render(items[1:], twin)
        assert 0 < (x - y).abs().mean() < 0.25, (a, b)


def test_every_prompt_word_is_one_token():
    tok = CLIPTokenizer.from_pretrained(BASE_DIR / "tokenizer", model_max_length=77)
    for item in world.all_items():
        for t in range(len(world.templates(item.style))):
            prompt = world.prompt_for(item, t)
            ids = tok(prompt).input_ids[1:-1]
            assert len(ids) == len(re.findall(r"'s|\w+|[^\s\w]", prompt)), prompt
    assert tok("a dog").input_ids != tok("a cat").input_ids


def test_committed_judge_is_accurate_and_rejects_junk():
    judge = Judge.load(JUDGE_DIR)
    metrics = held_out_metrics(judge, seed=4242, count=512)
    assert min(metrics["accuracy"].values()) >= 0.98
    assert metrics["negatives_rejected"] >= 0.95
    # pure noise and 50/50 blends are never named as a class
    gen, rng = torch.Generator().manual_seed(7), random.Random(7)
    noise = judge.classify(torch.rand(64, 3, 32, 32, generator=gen))
    assert all(v == NONE for head in noise.values() for v in head)
    items = world.sample_items(64, rng)
    others = [world.Item((i.shape + 2) % len(world.SHAPES), (i.color + 1) % len(world.COLORS), i.style) for i in items]
    blend = 0.5 * world.render(items, gen) + 0.5 * world.render(others, gen)
    shapes = judge.classify(blend)["shape"]
    assert sum(s == NONE for s in shapes) / len(shapes) >= 0.9


def test_committed_base_loads_as_a_stable_diffusion_pipeline():
    pipe = load_pipeline(BASE_DIR)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.config.sample_size == 16 and pipe.vae_scale_factor == 2
    size = sum(f.stat().st_size for f in BASE_DIR.rglob("*") if f.is_file())
    size += sum(f.stat().st_size for f in JUDGE_DIR.rglob("*") if f.is_file())
    assert size <= 30 * 2**20


def test_build_on_a_reduced_budget(tmp_path):
    """Every stage of the build runs and learns: the VAE reconstructs, the judge's color head (the first it learns)
    and its reject class work, the folders load. The full budget's accuracy on every head is the committed judge's
    test above; the shape and style heads need 150 steps at batch 128 to leave chance, which this test does not pay."""
    from esd.toy.build import BuildConfig, build
    cfg = BuildConfig(seed=1, images_per_combo=4, vae_steps=30, judge_steps=40, unet_steps=8)
    info = build(tmp_path, cfg, log=lambda *a: None)
    assert info["vae_mse"] < 0.05
    # chance is 1 in 5 (four colors and "none")
    assert info["judge"]["accuracy"]["color"] >= 0.85 and info["judge"]["negatives_rejected"] >= 0.8
    pipe = load_pipeline(tmp_path / "base")
    images = pipe(["a red circle"], num_inference_steps=3, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert Judge.load(tmp_path / "judge") is not None
