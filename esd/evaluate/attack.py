"""Recovery attack: learn a soft prompt embedding that brings an erased concept back.

Textual-inversion style (Gal et al. 2022), as in the attacks shown to undo ESD (Pham et al., "Circumventing
Concept Erasure Methods for Text-to-Image Generative Models", 2023): one new token's input embedding is
optimised, with the candidate's weights frozen, so that the candidate denoises the base model's own images
of the concept; then the concept's prompts, with the concept replaced by that token, are generated and
judged. Success is the share judged as the concept again.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from esd import sample
from esd.evaluate import toy as toy_eval
from esd.models import prediction_type
from esd.toy.judge import Judge

DEFAULT_STEPS = 60
# One token in both the toy vocabulary and CLIP's, unused by the toy's prompts; its embedding is replaced.
PLACEHOLDER_WORD = "cat"


class SoftToken:
    """Swap one placeholder token's input embedding for a trainable vector, by hooks on the embedding layer."""

    def __init__(self, text_encoder, placeholder_id: int):
        self.layer = text_encoder.get_input_embeddings()
        self.id = placeholder_id
        self.vector = torch.nn.Parameter(self.layer.weight.detach().mean(0).clone())
        self._mask = None
        self._hooks = [self.layer.register_forward_pre_hook(self._pre), self.layer.register_forward_hook(self._post)]

    def _pre(self, module, args):
        ids = args[0]
        self._mask = (ids == self.id).unsqueeze(-1)

    def _post(self, module, args, output):
        return torch.where(self._mask, self.vector.to(output.dtype), output)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _placeholder_prompt(prompt: str, concept: str) -> str:
    return re.sub(re.escape(concept), PLACEHOLDER_WORD, prompt, flags=re.IGNORECASE)


def _embed(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.unet.device)
    return pipe.text_encoder(ids)[0]


def recover(pipe, judge: Judge, base: toy_eval.Judged, concept: str, steps: int = DEFAULT_STEPS, lr: float = 2e-2,
            batch: int = 16, seed: int = 0, sample_steps: int = toy_eval.EVAL_STEPS,
            guidance: float = toy_eval.EVAL_GUIDANCE) -> dict:
    """Run the attack on the candidate pipeline (left unchanged) and judge what it brings back, generated with
    SAMPLE_STEPS DDIM steps at GUIDANCE (an evaluation passes its own, so the rates compare with its base's)."""
    head, cls = toy_eval.concept_attribute(concept)
    idx = [i for i, t in enumerate(base.truth[head]) if t == cls]
    prompts = [_placeholder_prompt(base.prompts[i], concept) for i in idx]
    seeds = [10_000 + i for i in idx]
    gen = torch.Generator().manual_seed(seed)
    unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
    with torch.no_grad():
        latents = vae.encode(base.images[idx].to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
        latents = latents * vae.config.scaling_factor

    placeholder_id = pipe.tokenizer(PLACEHOLDER_WORD).input_ids[1]
    token = SoftToken(pipe.text_encoder, placeholder_id)
    opt = torch.optim.Adam([token.vector], lr=lr)
    was_training = unet.training
    unet.eval()
    loss = None
    try:
        for _ in range(steps):
            pick = torch.randint(len(idx), (batch,), generator=gen)
            z = latents[pick]
            noise = torch.randn(z.shape, generator=gen).to(z.device)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(z.device)
            noisy = sched.add_noise(z, noise, t)
            pred = unet(noisy, t, _embed(pipe, [prompts[i] for i in pick.tolist()])).sample
            # what the UNet was trained to predict: the noise, or the velocity of a v-prediction model
            target = sched.get_velocity(z, noise, t) if prediction_type(pipe) == "v_prediction" else noise
            loss = F.mse_loss(pred.float(), target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            images = sample.generate(pipe, prompts, seeds, steps=sample_steps, guidance=guidance)
    finally:
        token.remove()
        unet.train(was_training)
    judged = judge.classify(images)[head]
    return {"success": sum(p == cls for p in judged) / len(judged), "steps": steps, "images": len(judged),
            "final_loss": None if loss is None else loss.item()}
