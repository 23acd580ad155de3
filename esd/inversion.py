"""Textual inversion of one placeholder token (Gal et al. 2022): the input embedding that makes a pipeline's UNet
denoise given images of a concept, with every weight frozen.

The recovery attack (esd/evaluate/attack.py) learns one on a candidate and judges what it brings back, as the
attacks shown to undo ESD do (Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative
Models", 2023); the adversarial closed-form edit (esd/uce.py, `uce-tokens-adv`) learns them on its own edit and
erases what they reach.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F

from esd.models import is_xl, prediction_type

# One token in both the toy vocabulary and CLIP's, unused by the toy's prompts; its embedding is replaced.
PLACEHOLDER_WORD = "cat"


class SoftToken:
    """Swap one placeholder token's input embedding for a trainable vector, by hooks on the embedding layer."""

    def __init__(self, text_encoder, placeholder_id: int, vector: torch.Tensor | None = None):
        self.layer = text_encoder.get_input_embeddings()
        self.id = placeholder_id
        start = self.layer.weight.detach().mean(0) if vector is None else vector.to(self.layer.weight)
        self.vector = torch.nn.Parameter(start.clone())
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


def placeholder_id(pipe) -> int:
    return pipe.tokenizer(PLACEHOLDER_WORD).input_ids[1]


@contextlib.contextmanager
def soft_token(pipe, vector: torch.Tensor | None = None):
    """The placeholder word stands for the vector (or a trainable one from the mean embedding) inside the block."""
    token = SoftToken(pipe.text_encoder, placeholder_id(pipe), vector)
    try:
        yield token
    finally:
        token.remove()


def placeholder_prompt(prompt: str, concept: str) -> str:
    """The prompt with the concept replaced by the placeholder word."""
    return re.sub(re.escape(concept), PLACEHOLDER_WORD, prompt, flags=re.IGNORECASE)


def check_pipeline(pipe) -> None:
    """Inversion reads one text encoder's output as the UNet's whole conditioning (SD 1.x and 2.x)."""
    if is_xl(pipe):
        raise ValueError("textual inversion here supports pipelines with one text encoder (SD 1.x, 2.x), not SDXL")


def embed(pipe, prompts: list[str]) -> torch.Tensor:
    """Token embeddings of the prompts, with gradients through the text encoder (to the soft token)."""
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.unet.device)
    return pipe.text_encoder(ids)[0]


@torch.no_grad()
def latents_of(pipe, images: torch.Tensor) -> torch.Tensor:
    """The VAE's latents of images in [0, 1]."""
    vae = pipe.vae
    return vae.encode(images.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean * vae.config.scaling_factor


def learn(pipe, token: SoftToken, prompts: list[str], latents: torch.Tensor, steps: int, lr: float = 2e-2,
          batch: int = 16, seed: int = 0) -> float | None:
    """Optimise the token so that the UNet, frozen, denoises the latents given their prompts (each naming the
    placeholder); returns the last step's loss. The UNet is left as it was found."""
    check_pipeline(pipe)
    gen = torch.Generator().manual_seed(seed)
    unet, sched = pipe.unet, pipe.scheduler
    opt = torch.optim.Adam([token.vector], lr=lr)
    was_training = unet.training
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.eval().requires_grad_(False)
    loss = None
    try:
        for _ in range(steps):
            pick = torch.randint(len(prompts), (batch,), generator=gen)
            z = latents[pick]
            noise = torch.randn(z.shape, generator=gen).to(z.device)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(z.device)
            noisy = sched.add_noise(z, noise, t)
            pred = unet(noisy, t, embed(pipe, [prompts[i] for i in pick.tolist()])).sample
            # what the UNet was trained to predict: the noise, or the velocity of a v-prediction model
            target = sched.get_velocity(z, noise, t) if prediction_type(pipe) == "v_prediction" else noise
            loss = F.mse_loss(pred.float(), target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        unet.train(was_training)
        for n, p in unet.named_parameters():
            p.requires_grad_(grads[n])
    return None if loss is None else loss.item()
