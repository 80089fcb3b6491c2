"""Bag-of-tokens text / label encoder for CLIP-style annotations (docs/METHOD.md section 2).

Labels and weak captions from the corpus side file are turned into
L2-normalised embeddings ``psi(l)`` that views are scored against. Nothing is
downloaded: the vocabulary is built from the annotation strings themselves
(``build_vocab``); words outside it fall into a few hashed buckets (stable
crc32, so every process agrees) instead of one shared unknown token.

    vocab = build_vocab(["cat on a mat", "dog"])
    enc = TextEncoder(vocab, out_dim=128)
    psi = enc(["cat", "a dog"])           # (2, 128) unit vectors

A label is just a one-word text, so labels and captions share this path.
"""
from __future__ import annotations

import re
import zlib
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text``."""
    return _WORD.findall(text.lower())


def build_vocab(texts: Iterable[str], min_count: int = 1) -> list[str]:
    """Sorted words that occur at least ``min_count`` times in ``texts``."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in tokenize(t):
            counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, c in counts.items() if c >= min_count)


class TextEncoder(nn.Module):
    """texts (list of L strings) -> (L, out_dim) unit vectors: mean word embedding -> MLP.

    Token ids: vocabulary words 0..V-1, then ``oov_buckets`` hashed buckets,
    then one id for texts without any word.
    """

    def __init__(self, vocab: Sequence[str], out_dim: int = 128, embed_dim: int = 256, oov_buckets: int = 64):
        super().__init__()
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.oov_buckets = oov_buckets
        self.empty_id = len(self.vocab) + oov_buckets
        self.embedding = nn.EmbeddingBag(self.empty_id + 1, embed_dim, mode="mean")
        nn.init.normal_(self.embedding.weight, std=1.0)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, out_dim))

    def token_ids(self, text: str) -> list[int]:
        ids = []
        for w in tokenize(text):
            i = self.index.get(w)
            if i is None:
                i = len(self.vocab) + zlib.crc32(w.encode()) % max(self.oov_buckets, 1)
            ids.append(i)
        return ids or [self.empty_id]

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = self.embedding.weight.device
        if len(texts) == 0:
            return self.embedding.weight.new_zeros(0, self.mlp[-1].out_features)
        ids = [self.token_ids(t) for t in texts]
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=device)
        offsets = torch.tensor([0] + [len(r) for r in ids[:-1]], dtype=torch.long, device=device).cumsum(0)
        bag = self.embedding(flat, offsets)                    # (L, embed_dim): mean of word vectors
        return F.normalize(self.mlp(bag), dim=-1, eps=1e-6)    # (L, out_dim)
