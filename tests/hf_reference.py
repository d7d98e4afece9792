"""The plain Hugging Face way to batch text, that the project's own token path is checked against."""

from __future__ import annotations

import numpy as np
import torch


def collate(tokenizer, texts, max_length: int, labels=None) -> dict:
    """Tokenize a batch with the transformers wrapper, padded to its own longest sequence."""
    batch = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    if labels is not None:
        batch["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return dict(batch)
