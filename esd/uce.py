"""UCE: erase concepts in closed form by editing the cross-attention keys and values (Gandikota et al., "Unified
Concept Editing in Diffusion Models", WACV 2024, arXiv 2308.14761), optionally hardened as RECE does (Gong et al.,
"Reliable and Efficient Concept Erasure of Text-to-Image Diffusion Models", ECCV 2024, arXiv 2407.12383).

Text reaches the UNet only through the cross-attention projections W (attn2.to_k, attn2.to_v: text dim d -> out).
UCE moves every W so that the erased prompts' tokens c_i give the values v*_i of a guide, the preserved prompts'
tokens c_j keep theirs, and W stays near itself (UCE, Eq. 7):

    W_new = (lamb W + es sum_i v*_i c_i^T + ps sum_j (W c_j) c_j^T)
            (lamb I + es sum_i c_i c_i^T + ps sum_j c_j c_j^T)^-1

with v*_i = W g_i + push (W g_i - W c_i) for the guide's token g_i: push 0 is UCE itself (map onto the guide);
push > 0 goes past the guide, away from the concept, as ESD's negative guidance does. Every target is W times an
embedding, v*_i = W t_i with t_i = (1 + push) g_i - push c_i, so W factors out on the left and one d x d matrix
serves every projection; only d x d sums of token outer products are kept, however many prompts there are:

    W_new = W M,   M = (lamb I + es sum_i t_i c_i^T + ps P) (lamb I + es sum_i c_i c_i^T + ps P)^-1,
    P = n sum_j c_j c_j^T

where n is the number of concepts erased: UCE's ps weighs the preservation against one concept's erase sums, and a
solve of n concepts (one takedown of several, or a lineage's takedowns solved again together) keeps that balance
for each of them.

RECE hardens the edit. The embedding e* that makes the edited projections reproduce the original keys and values
of the concept is, per token, in closed form (S = sum over projections of W^T W):

    e* = argmin_e sum_W ||W_new e - W c||^2 + reg ||e||^2 = (M^T S M + reg I)^-1 M^T S c = K c

Each round adds every e* to the erase set, with the concept's own target t, and solves again from the original
weights: sum t c^T gains (sum t c^T) K^T and sum c c^T gains K (sum c c^T) K^T.

The tokens of a prompt are UCE's: from its final word through EOS and padding, aligned with the guide prompt's at
their final words. Text embeddings leave CLIP through a LayerNorm, so they span at most d - 1 directions and the
sums are singular: lamb (and reg) > 0 keep both solves well posed. Solves run in float64 on the CPU; the new weights
are rounded to the base's storage dtype, so base + delta is exactly the edited model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from esd import delta as delta_lib
from esd import inversion, methods, sample
from esd.models import prediction_type
from esd.erase import (EraseConfig, EraseError, delta_dtype, encode, finish_delta, model_defaults, normal_concept,
                       prompts, start_from)

CHUNK = 64   # prompts per text-encoder batch
# Adversarial rounds (uce-tokens-adv): how many of a concept's erase prompts the model draws for the inversion, with
# what seeds (apart from the evaluation's) and DDIM steps
ATTACK_IMAGES, ATTACK_SEED, ATTACK_SAMPLE_STEPS = 24, 20_000, 20


def _span(ids: list[int], words: list[int]) -> range:
    """Where the token ids of words first occur in ids (empty if nowhere)."""
    for i in range(len(ids) - len(words) + 1):
        if ids[i:i + len(words)] == words:
            return range(i, i + len(words))
    return range(0)


@torch.no_grad()
def aligned(pipe, pairs: list[tuple], concept_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (N, d), float64 on CPU, of each prompt and of its partner, as UCE aligns old and new text:
    from the final word through EOS and padding, the two aligned at their final words and cut to one length.

    With concept_tokens, a pair's third element (the concept) also contributes its own tokens wherever they stand
    in the prompt, each aligned with the partner's token at the same position, or with the partner's final word
    if the partner is shorter. A causal text encoder gives a concept at the start of a prompt the same embedding
    whatever follows, and no token after it; UCE's alignment alone never edits those."""
    if not pairs:
        return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64)
    tok = pipe.tokenizer
    firsts, seconds = [], []
    for k in range(0, len(pairs), CHUNK):
        chunk = pairs[k:k + CHUNK]
        texts = list(dict.fromkeys(text for pair in chunk for text in pair[:2]))   # each distinct prompt once
        emb = encode(pipe, texts).to("cpu", torch.float64)
        enc = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        last = dict(zip(texts, (enc.attention_mask.sum(1) - 2).tolist()))   # the final word: before EOS
        row = {text: i for i, text in enumerate(texts)}
        for x, y, *concept in chunk:
            a, b = last[x], last[y]
            length = emb.shape[1] - max(a, b)
            firsts.append(emb[row[x], a:a + length])
            seconds.append(emb[row[y], b:b + length])
            if concept_tokens and concept:
                span = [p for p in _span(enc.input_ids[row[x]].tolist(), tok(concept[0]).input_ids[1:-1]) if p < a]
                if span:
                    firsts.append(emb[row[x], span])
                    seconds.append(emb[row[y], [min(p, b) for p in span]])
    return torch.cat(firsts), torch.cat(seconds)


@dataclass
class Sums:
    """Sums over tokens of outer products: t c^T, c c^T and t t^T (the last only to measure the residual)."""
    tc: torch.Tensor
    cc: torch.Tensor
    tt: torch.Tensor

    @classmethod
    def zero(cls, d: int) -> "Sums":
        return cls(*(torch.zeros(d, d, dtype=torch.float64) for _ in range(3)))

    def plus(self, other: "Sums", scale: float = 1.0) -> "Sums":
        return Sums(self.tc + scale * other.tc, self.cc + scale * other.cc, self.tt + scale * other.tt)


def sums(pipe, pairs: list[tuple], push: float, d: int, concept_tokens: bool = False) -> Sums:
    """The sums for prompts c and their guides g, with targets t = (1 + push) g - push c, a chunk at a time."""
    out = Sums.zero(d)
    for k in range(0, len(pairs), CHUNK):
        c, g = aligned(pipe, pairs[k:k + CHUNK], concept_tokens)
        if c.shape[1] != d:
            raise EraseError(f"text embeddings have {c.shape[1]} dimensions, the cross-attention reads {d}")
        t = (1 + push) * g - push * c
        out.tc += t.T @ c
        out.cc += c.T @ c
        out.tt += t.T @ t
    return out


def solve(lamb: float, tc: torch.Tensor, cc: torch.Tensor, preserve: torch.Tensor) -> torch.Tensor:
    """UCE, Eq. 7, with W factored out: M such that W_new = W M for every projection (sums already scaled)."""
    eye = torch.eye(len(cc), dtype=torch.float64)
    return torch.linalg.solve((lamb * eye + cc + preserve).T, (lamb * eye + tc + preserve).T).T   # a b^-1


def names(text: str, concepts: set[str]) -> bool:
    """Whether the text names any of the (normalised) concepts as whole words."""
    text = normal_concept(text)
    return any(re.search(rf"(?<!\w){re.escape(c)}(?!\w)", text) for c in concepts)


def erase_prompts_of(cfg: EraseConfig, erased: set[str]) -> list[tuple]:
    """cfg's erase prompts (with their guides), less those naming a concept another erasure solved with it removes."""
    others = erased - {normal_concept(c) for c in cfg.concepts}
    kept = [p for p in prompts(cfg)[0] if not names(p[0], others) and not names(p[1], others)]
    if not kept:
        raise EraseError(f"every prompt erasing {', '.join(cfg.concepts)} names another erased concept; "
                         "give templates that do not")
    return kept


def adversarial_sums(pipe, erase_prompts: list[tuple], concept: str, vectors: list, push: float, d: int) -> Sums:
    """The sums for the concept's erase prompts with the concept replaced by each soft token: the token's own
    embedding and what follows it aimed at the guide prompt's, as the concept's are."""
    key = normal_concept(concept)
    pairs = [(inversion.placeholder_prompt(x, c), y, inversion.PLACEHOLDER_WORD)
             for x, y, c in erase_prompts if normal_concept(c) == key]
    out = Sums.zero(d)
    for v in vectors:
        with inversion.soft_token(pipe, torch.as_tensor(v, dtype=torch.float32)):
            out = out.plus(sums(pipe, pairs, push, d, concept_tokens=True))
    return out


def with_soft_tokens(pipe, e: Sums, cfg: EraseConfig, erase_prompts: list[tuple], d: int) -> Sums:
    """e plus the sums of cfg's recorded soft tokens, each concept's in turn, at erase_scale x attack_scale."""
    for concept, vectors in (cfg.soft_tokens or {}).items():
        e = e.plus(adversarial_sums(pipe, erase_prompts, concept, vectors, cfg.push, d),
                   cfg.erase_scale * cfg.attack_scale)
    return e


def terms(pipe, configs: list[EraseConfig], d: int) -> tuple[Sums, torch.Tensor]:
    """The scaled sums of erasures solved together: each one's erase prompts (with their guides, its push and erase
    scale; with the soft tokens its adversarial rounds learned in place of its concepts), and the union of their
    preserve prompts (each once, at the scale of the first erasure that names it), times the number of concepts
    erased.
    A prompt that names a concept another of them erases is left out: its guide or its preservation would hold on
    to what that one removes (a style's guide "a red circle" against the erasure of circle)."""
    erased = {normal_concept(c) for cfg in configs for c in cfg.concepts}
    e = Sums.zero(d)
    kept: dict[tuple, tuple[float, bool]] = {}
    for cfg in configs:
        erase_prompts = erase_prompts_of(cfg, erased)
        e = with_soft_tokens(pipe, e.plus(sums(pipe, erase_prompts, cfg.push, d, cfg.align == "concept"),
                                          cfg.erase_scale), cfg, erase_prompts, d)
        for p in prompts(cfg)[1]:
            if not names(p[0], erased):
                kept.setdefault(p, (cfg.preserve_scale, cfg.align == "concept"))
    preserve = torch.zeros(d, d, dtype=torch.float64)
    for scale, spans in set(kept.values()):
        group = [p for p, key in kept.items() if key == (scale, spans)]
        preserve += scale * sums(pipe, group, 0.0, d, spans).cc
    # Each erased concept adds its own erase sums, so the preservation is held in proportion to their number: each
    # concept is weighed against it as when it was solved alone, whether it came in one takedown or a stack of them
    return e, len(erased) * preserve


def lineage_configs(parent: delta_lib.Delta | None, edited: list[str]) -> list[EraseConfig] | None:
    """The closed-form erasures a parent delta was made of, as configs, so that a new one re-solves them all from the
    base at once. A trained erasure whose parameters are none of the `edited` ones (ESD-u beside the key/value
    projections) is left as it stands; None when one changed them too (the new edit then starts from its weights)."""
    if parent is None:
        return []
    configs = []
    for e in parent.manifest.get("erasures", []):
        hp = e.get("hyperparameters")
        method = methods.METHODS.get(e.get("method"))
        if hp is None or method is None:
            return None
        if method.kind != "closed-form":
            if any(method.selects(n) for n in edited):
                return None
            continue
        known = {k: v for k, v in hp.items() if k in EraseConfig.__dataclass_fields__ and k != "concepts"}
        configs.append(EraseConfig(list(e["concepts"]), **(known | {"method": e["method"]})))
    return configs


def recovered(m: torch.Tensor, s: torch.Tensor, reg: float) -> torch.Tensor:
    """RECE: K with e* = K c, the embedding whose edited keys and values best reproduce c's original ones."""
    eye = torch.eye(len(s), dtype=torch.float64)
    return torch.linalg.solve(m.T @ s @ m + reg * eye, m.T @ s)


def residual(m: torch.Tensor, s: torch.Tensor, e: Sums) -> float:
    """sum over projections and erase tokens of ||W M c - W t||^2 (m = I: before the edit)."""
    x = m @ e.cc @ m.T - m @ e.tc.T - e.tc @ m.T + e.tt
    return float(torch.trace(s @ x))


def edit(pipe, cfg: EraseConfig, parent: delta_lib.Delta | None = None, progress: bool = True,
         callback=None) -> delta_lib.Delta:
    """Erase cfg.concepts from the base pipeline's UNet in closed form, in place, and return the delta against
    that base; the contract of esd.erase.erase (a parent delta is applied first and carried)."""
    cfg = cfg.resolve(model_defaults(pipe))
    if cfg.kind != "closed-form":
        raise EraseError(f"{cfg.method} is not a closed-form method")
    learn_tokens = bool(cfg.attack_rounds) and cfg.soft_tokens is None
    if learn_tokens:
        try:
            inversion.check_pipeline(pipe)
        except ValueError as err:
            raise EraseError(f"{cfg.method}: {err}") from None
    unet = pipe.unet
    dtype = delta_dtype(pipe)
    base_sha256, base_state = start_from(unet, parent)
    params = methods.select(unet, cfg.method)
    for n, p in params.items():
        base_state.setdefault(n, p.detach().clone())
    # Erasures stack by solving again, from the base weights, for every closed-form erasure of the lineage at once:
    # composing one solve on top of another would carry each edit's drift into the next (measured: one style then
    # one shape takes the untouched artists to 0%). Erasures trained elsewhere in the UNet stay as they are; one
    # trained on these projections makes the edit start from the parent's weights.
    earlier = lineage_configs(parent, list(params))
    joint = earlier is not None
    start = {n: (base_state[n] if joint else p.detach()) for n, p in params.items()}
    weights = {n: w.to("cpu", torch.float64) for n, w in start.items()}
    d = {w.shape[1] for w in weights.values()}
    if len(d) != 1:
        raise EraseError(f"the cross-attention projections read inputs of different sizes: {sorted(d)}")
    d = d.pop()

    if learn_tokens:
        # what the model draws of the concept before the edit: the images each round's inversion learns from
        shown = concept_images(pipe, cfg)

    # Token embeddings of the erase prompts (with their guides) and the preserve prompts, as scaled sums
    configs = (earlier or []) + [cfg]
    e, preserve = terms(pipe, configs, d)
    s = sum(w.T @ w for w in weights.values())

    def write(m: torch.Tensor) -> None:
        """W M into the UNet, rounded to the base's storage dtype."""
        with torch.no_grad():
            for n, p in params.items():
                p.copy_((weights[n] @ m).to(dtype))

    attack_rounds = cfg.attack_rounds if learn_tokens else 0
    bar = tqdm(total=(cfg.rounds + 1) * (1 + attack_rounds), desc=f"{cfg.method} {', '.join(cfg.concepts)}",
               disable=not progress)
    step = 0

    def solved(e: Sums) -> tuple[torch.Tensor, float]:
        """Solve for every projection at once (UCE, Eq. 7), with RECE's rounds; loss: the share of the erase
        residual left."""
        nonlocal step
        tc, cc = e.tc, e.cc
        before = residual(torch.eye(d, dtype=torch.float64), s, e)
        for r in range(cfg.rounds + 1):
            m = solve(cfg.lamb, tc, cc, preserve)
            loss = residual(m, s, e) / before if before > 0 else 0.0
            step += 1
            bar.update()
            bar.set_postfix(residual=f"{loss:.5f}")
            if callback is not None:
                callback(step, loss)
            if r < cfg.rounds:
                # RECE: the embeddings that still recover the concept join the erase set, aimed at its targets
                k = recovered(m, s, cfg.robust_reg)
                tc, cc = tc + e.tc @ k.T, cc + k @ e.cc @ k.T
        return m, loss

    m, loss = solved(e)
    if learn_tokens:
        # Adversarial rounds: invert the concept's images on the edited model; the soft token found joins the erase
        # set in the concept's place (every erase prompt with the token for the concept, aimed at the guide), and the
        # system is solved again from the recorded tokens, as a lineage solves this edit again without learning
        # (terms() adds this erasure's tokens last, onto the sums it made without them: `untokened`).
        untokened = e
        erase_prompts = erase_prompts_of(cfg, {normal_concept(c) for other in configs for c in other.concepts})
        cfg.soft_tokens = {c: [] for c in cfg.concepts}
        for r in range(attack_rounds):
            write(m)
            for c in cfg.concepts:
                texts, latents = shown[c]
                with inversion.soft_token(pipe) as token:
                    inversion.learn(pipe, token, texts, latents, cfg.attack_steps, seed=cfg.seed + 1 + r)
                    cfg.soft_tokens[c].append(token.vector.detach().float().cpu().tolist())
            e = with_soft_tokens(pipe, untokened, cfg, erase_prompts, d)
            m, loss = solved(e)
    bar.close()
    write(m)
    return finish_delta(unet, cfg, base_sha256, base_state, dtype, parent.manifest if parent is not None else None,
                        loss, prediction_type(pipe))


@torch.no_grad()
def concept_images(pipe, cfg: EraseConfig) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Per concept, ATTACK_IMAGES of its erase prompts (a seeded draw), with the concept replaced by the placeholder,
    and the latents of what the pipeline draws for the prompts themselves."""
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for c in cfg.concepts:
        key = normal_concept(c)
        own = [x for x, _, concept in prompts(cfg)[0] if normal_concept(concept) == key]
        pick = torch.randperm(len(own), generator=gen)[:ATTACK_IMAGES].tolist()
        texts = [own[i] for i in pick]
        images = sample.generate(pipe, texts, [ATTACK_SEED + i for i in range(len(texts))], steps=ATTACK_SAMPLE_STEPS)
        out[c] = [inversion.placeholder_prompt(t, c) for t in texts], inversion.latents_of(pipe, images)
    return out
