"""Recovery attack: learn a soft prompt embedding that brings an erased concept back.

Textual inversion (esd/inversion.py), as in the attacks shown to undo ESD: one new token's input embedding is
optimised, with the candidate's weights frozen, so that the candidate denoises the base model's own images
of the concept; then the concept's prompts, with the concept replaced by that token, are generated and
judged. Success is the share judged as the concept again.
"""

from __future__ import annotations

import torch

from esd import inversion, sample
from esd.evaluate import toy as toy_eval
from esd.toy.judge import Judge

DEFAULT_STEPS = 60


def recover(pipe, judge: Judge, base: toy_eval.Judged, concept: str, steps: int = DEFAULT_STEPS, lr: float = 2e-2,
            batch: int = 16, seed: int = 0, sample_steps: int = toy_eval.EVAL_STEPS,
            guidance: float = toy_eval.EVAL_GUIDANCE) -> dict:
    """Run the attack on the candidate pipeline (left unchanged) and judge what it brings back, generated with
    SAMPLE_STEPS DDIM steps at GUIDANCE (an evaluation passes its own, so the rates compare with its base's)."""
    head, cls = toy_eval.concept_attribute(concept)
    idx = [i for i, t in enumerate(base.truth[head]) if t == cls]
    prompts = [inversion.placeholder_prompt(base.prompts[i], concept) for i in idx]
    seeds = [10_000 + i for i in idx]
    latents = inversion.latents_of(pipe, base.images[idx])
    with inversion.soft_token(pipe) as token:
        loss = inversion.learn(pipe, token, prompts, latents, steps, lr, batch, seed)
        with torch.no_grad():
            images = sample.generate(pipe, prompts, seeds, steps=sample_steps, guidance=guidance)
    judged = judge.classify(images)[head]
    return {"success": sum(p == cls for p in judged) / len(judged), "steps": steps, "images": len(judged),
            "final_loss": loss}
