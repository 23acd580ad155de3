"""A word-level CLIP BPE vocabulary for the toy world.

Every word of the toy's prompts becomes one token (as common words are single tokens in CLIP's own
vocabulary); single characters stay in the vocabulary so that any other word still tokenizes, letter
by letter, instead of collapsing to the unknown token. The files are the standard vocab.json +
merges.txt that `CLIPTokenizer.from_pretrained` reads.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from esd.toy import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EXTRA_WORDS = ["a", "an", "the", "of", "in", "by", "style", "painting", "picture", "shape", "something", "image",
               "photo", "art", "and", "with", "'s", "look", "drew", "nude", "person", "naked", "dog", "cat"]


def _words() -> list[str]:
    words: list[str] = []
    texts = world.SHAPES + world.COLOR_NAMES + [w for a in world.ARTISTS for w in a.split()] + EXTRA_WORDS
    for w in texts:
        w = w.lower()
        if w not in words:
            words.append(w)
    return words


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges by rank, exactly as CLIP's tokenizer does."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build(folder: Path) -> int:
    """Write vocab.json and merges.txt into folder; returns the vocabulary size."""
    chars = list(string.ascii_lowercase + string.digits + "'.,!?-")
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in _words():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        symbols = _bpe(symbols, ranks)
        # New merges rank below every earlier one, so words merged before stay merged the same way.
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in vocab:
                vocab.append(pair[0] + pair[1])
            symbols = _bpe(symbols, ranks)
    vocab += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return len(vocab)
