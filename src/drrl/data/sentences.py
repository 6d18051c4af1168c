"""Sentences as token ids for an encoder, batched by length so that no batch needs a padding mask (efficient
attentions treat masks differently or not at all)."""

from __future__ import annotations

from collections import defaultdict

import torch

SHUFFLE_SEED = 1234  # the fixed order of each split of a sentence dataset (independent of the run seeds)


def encode_sentences(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids with the model's special tokens ([CLS] ... [SEP]), truncated to ``max_len``."""
    return [tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts]


def length_batches(ids: list[list[int]], batch_size: int, generator: torch.Generator | None = None):
    """Index batches in which every sentence has the same length (no padding); shuffled when a generator is
    given (within each length, then the order of the batches)."""
    by_len = defaultdict(list)
    for i, x in enumerate(ids):
        by_len[len(x)].append(i)
    batches = []
    for n in sorted(by_len):
        idx = by_len[n]
        if generator is not None:
            idx = [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
        batches += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if generator is not None:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
    return batches
