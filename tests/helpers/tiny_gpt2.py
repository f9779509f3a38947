"""The tiny, deterministic GPT-2 and data the Hugging Face tests train (one process or several)."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def dataset(n: int = 24, length: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows
