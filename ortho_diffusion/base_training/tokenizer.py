"""A small word-level ``CLIPTokenizer`` for the shapes world, built from a local vocabulary.

CLIP's tokenizer is byte-pair encoding: a word becomes a single token only if the merge list
can rebuild it from characters. We write a vocabulary (every character, every world word)
and grow the merge list until each world word tokenizes to exactly one id; unknown words still
fall back to characters, so any prompt can be encoded.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from ..shapes import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32
"""Token length of every prompt (BOS + words + EOS + padding); captions need at most ~26."""


def _write(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


def _load(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,  # as in Stable Diffusion 1.x
        unk_token=EOS,
        model_max_length=MAX_LENGTH,
    )


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` in which each of ``words`` (default: :func:`world.world_words`) is
    one token. ``model_max_length`` is :data:`MAX_LENGTH`."""
    words = sorted(set(words if words is not None else world.world_words()))
    symbols = list(string.ascii_lowercase + string.digits) + list(",.!?'-")
    vocab: dict[str, int] = {}
    for tok in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []

    def add_merge(a: str, b: str) -> None:
        if (a, b) not in merges:
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))

    # Left-to-right prefix merges for each word: "s t", "st a", "sta r</w>".
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        acc = pieces[0]
        for p in pieces[1:]:
            add_merge(acc, p)
            acc += p
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Merges of different words can pre-empt each other ("t a" inside "star"); finish each
        # stuck segmentation with a merge appended last, until every word is one token.
        for _ in range(20):
            vocab_final = dict(vocab)
            vocab_final[BOS] = len(vocab_final)
            vocab_final[EOS] = len(vocab_final)
            _write(folder, vocab_final, merges)
            tok = _load(folder)
            stuck = [tok.tokenize(w) for w in words if len(tok.tokenize(w)) != 1]
            if not stuck:
                return tok
            for pieces in stuck:
                add_merge(pieces[0], pieces[1])
    raise RuntimeError(f"could not make single tokens of {stuck}")
