"""Long documents: the windows a text longer than `--max-seq-length` is scored in, and how their outputs
combine into one result per row.

- `truncate`: the head only (the text's first window, status `truncated`).
- `head-tail`: the first quarter and the last three quarters of one window (status `truncated`: the middle
  is dropped).
- `windows`: windows of the window's size that overlap by `--stride` tokens, the last one aligned to the
  text's end so every window is full; at most `--max-windows`: past that the first max-1 windows and the
  last one (status `capped`).

A long text is never tokenized whole: a prefix (and a suffix) of about twice the characters the needed
tokens take is, doubled until it holds them, so a 5 MB text costs what its first windows cost. Slices are
cut at whitespace, where tokenization does not depend on what follows. Special tokens come from the
tokenizer's own template (read off an encoding), so BERT's `[CLS] a [SEP] b [SEP]` and RoBERTa's
`<s> a </s></s> b </s>` both work. Pairs: the shorter side keeps at most half of the window; only the
longer side is windowed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

MODES = ("truncate", "head-tail", "windows")
COMBINES = ("mean-probs", "mean-logits", "max-confidence")
CHARS_PER_TOKEN = 8  # first guess of the text that holds n tokens (English WordPiece: ~4.5); doubled if short
HEAD_SHARE = 4  # head-tail: the head is a quarter of the window (Sun et al. 2019: 128 of 510)
_NONSPACE = re.compile(r"\S")
_SPACES = " \n\t\r"


@functools.lru_cache(maxsize=4)
def full_tokenizer(tokenizer_json: str):
    """The Rust tokenizer without truncation or padding: the windows are cut here, not by it."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@dataclass(frozen=True)
class Template:
    """The special tokens around one text (`prefix a middle`) or a pair (`prefix a middle b suffix`) and the
    segment ids of each part, read off the tokenizer's encoding of placeholders."""

    ids: tuple  # (prefix, middle, suffix) token ids
    types: tuple  # (prefix, a, middle, b, suffix) segment ids, one per part

    @classmethod
    def of(cls, tokenizer, pair: bool) -> "Template":
        x, y = (tokenizer.encode(w, add_special_tokens=False).ids for w in ("x", "y"))
        e = tokenizer.encode("x", "y") if pair else tokenizer.encode("x")
        ids, types = e.ids, e.type_ids
        i = _find(ids, x, 0)
        j = _find(ids, y, i + len(x)) if pair else len(ids)
        end = j + len(y) if pair else len(ids)
        return cls((tuple(ids[:i]), tuple(ids[i + len(x):j]), tuple(ids[end:])),
                   (types[0] if i else 0, types[i], types[i + len(x)] if j > i + len(x) else types[i],
                    types[j] if pair else 0, types[-1] if end < len(ids) else 0))

    @property
    def specials(self) -> int:
        return sum(map(len, self.ids))

    def wrap(self, a: np.ndarray, b: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """One window's token ids and segment ids."""
        parts = [np.asarray(self.ids[0], np.int32), a, np.asarray(self.ids[1], np.int32)]
        if b is not None:
            parts += [b, np.asarray(self.ids[2], np.int32)]
        types = np.concatenate([np.full(len(p), t, np.int32) for p, t in zip(parts, self.types)])
        return np.concatenate(parts).astype(np.int32), types


def _find(seq: list, sub: list, start: int) -> int:
    for k in range(start, len(seq) - len(sub) + 1):
        if seq[k:k + len(sub)] == sub:
            return k
    raise ValueError(f"tokenizer: cannot find the placeholder {sub} in its own encoding {seq}")


def head_tokens(tokenizer, texts: list, need: list) -> list[tuple[np.ndarray, bool]]:
    """Each text's first `need[i]` tokens (no special tokens) and whether the text has more, in batched rounds
    over prefixes that double until they hold enough."""
    out: list = [None] * len(texts)
    todo, chars = list(range(len(texts))), [n * CHARS_PER_TOKEN for n in need]
    while todo:
        ends = [head_cut(texts[i], chars[i]) for i in todo]
        encodings = tokenizer.encode_batch_fast([texts[i][:end] for i, end in zip(todo, ends)],
                                                add_special_tokens=False)
        later = []
        for i, end, e in zip(todo, ends, encodings):
            if len(e.ids) >= need[i] or end >= len(texts[i]):
                more = len(e.ids) > need[i] or (end < len(texts[i]) and bool(_NONSPACE.search(texts[i], end)))
                out[i] = (np.asarray(e.ids[:need[i]], np.int32), more)
            else:
                chars[i] *= 2
                later.append(i)
        todo = later
    return out


def tail_tokens(tokenizer, texts: list, need: list) -> list[np.ndarray]:
    """Each text's last `need[i]` tokens (no special tokens), from suffixes that double until they hold them."""
    out: list = [None] * len(texts)
    todo, chars = list(range(len(texts))), [n * CHARS_PER_TOKEN for n in need]
    while todo:
        starts = [_cut_back(texts[i], chars[i]) for i in todo]
        encodings = tokenizer.encode_batch_fast([texts[i][s:] for i, s in zip(todo, starts)],
                                                add_special_tokens=False)
        later = []
        for i, s, e in zip(todo, starts, encodings):
            if len(e.ids) >= need[i] or s == 0:
                out[i] = np.asarray(e.ids[-need[i]:] if need[i] else [], np.int32)
            else:
                chars[i] *= 2
                later.append(i)
        todo = later
    return out


def head_cut(text: str, chars: int) -> int:
    """Where a prefix of about `chars` characters ends: at whitespace in its second half, else at `chars`."""
    if chars >= len(text):
        return len(text)
    at = max(text.rfind(c, chars // 2, chars) for c in _SPACES)
    return at if at > 0 else chars


def _cut_back(text: str, chars: int) -> int:
    """Where a suffix of about `chars` characters starts: at whitespace in its first half, else at len-chars."""
    if chars >= len(text):
        return 0
    lo = len(text) - chars
    found = [k for k in (text.find(c, lo, lo + chars // 2) for c in _SPACES) if k >= 0]
    return min(found) if found else lo


def starts(length: int, size: int, step: int) -> list[int]:
    """Window starts over `length` tokens: every `step`, the last one aligned to the end (all windows full)."""
    if length <= size:
        return [0]
    n = 1 + -(-(length - size) // step)
    return [min(k * step, length - size) for k in range(n)]


class Windower:
    """The windows of texts too long for one window, by `mode` (head-tail or windows)."""

    def __init__(self, tokenizer_json: str, max_length: int, mode: str, stride: int, max_windows: int,
                 pair: bool):
        self.tokenizer = full_tokenizer(tokenizer_json)
        self.template = Template.of(self.tokenizer, pair)
        self.size = max_length - self.template.specials  # a window's own tokens
        self.mode, self.stride, self.max_windows = mode, stride, max_windows

    def need(self, size: int) -> int:
        """Tokens that `max_windows` windows of `size` cover: one more means the cap is hit."""
        if self.mode == "head-tail":
            return size
        return size + (self.max_windows - 1) * self.step(size)

    def step(self, size: int) -> int:
        return max(1, size - min(self.stride, size // 2))

    def documents(self, texts: list, pairs: Optional[list] = None) -> list[tuple[list, str]]:
        """Per text: its windows [(ids, segment ids)] and its status (ok, truncated or capped)."""
        heads = head_tokens(self.tokenizer, texts, [self.need(self.size)] * len(texts))
        other = head_tokens(self.tokenizer, pairs, [self.need(self.size)] * len(pairs)) if pairs else None
        plans, tails = [], []
        for i, (ids, more) in enumerate(heads):
            status, short, swap = "ok", None, False
            if other is not None:  # only the longer side is windowed; the other keeps up to half a window
                b, b_more = other[i]
                swap = (b_more, len(b)) > (more, len(ids))
                if swap:
                    ids, more, b, b_more = b, b_more, ids, more
                keep = self.size // 2
                if b_more or len(b) > keep:
                    status = "truncated"
                short = b[:keep]
            size = self.size - (len(short) if short is not None else 0)
            more = more or len(ids) > self.need(size)
            if not more:
                plan = [ids[s:s + size] for s in starts(len(ids), size, self.step(size))]
                tail = 0
            elif self.mode == "head-tail":
                tail = size - size // HEAD_SHARE
                plan, status = [ids[:size // HEAD_SHARE]], "truncated"
            else:
                plan = [ids[k * self.step(size):k * self.step(size) + size] for k in range(self.max_windows - 1)]
                tail, status = size, "capped"
            plans.append((plan, status, short, swap, tail))
            if tail:
                tails.append((i, tail))
        side = [(pairs[i] if plans[i][3] else texts[i]) for i, _ in tails]
        for (i, _), t in zip(tails, tail_tokens(self.tokenizer, side, [n for _, n in tails])):
            plan = plans[i][0]
            if self.mode == "head-tail":
                plan[0] = np.concatenate([plan[0], t])
            else:
                plan.append(t)
        return [([self.template.wrap(*_sides(w, short, swap)) for w in plan], status)
                for plan, status, short, swap, _ in plans]


def _sides(window: np.ndarray, short: Optional[np.ndarray], swap: bool) -> tuple:
    """A window's texts in the input's order: (text,), (text, pair), the windowed side either one."""
    if short is None:
        return (window,)
    return (short, window) if swap else (window, short)


def combine(logits: np.ndarray, owner: np.ndarray, rows: int, task, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, num_labels) outputs from per-window logits (`owner`: each window's row), NaN for rows without
    a window, and the windows per row. Regression always averages the values."""
    import torch

    from raysst.task import REGRESSION, SINGLE

    counts = np.bincount(owner, minlength=rows)
    probs = task.outputs(torch.from_numpy(logits)).numpy()
    out = np.full((rows, task.num_labels), np.nan, np.float32)
    has = counts > 0
    if not has.any():  # a chunk of nulls and empty texts only
        return out, counts
    if rule == "mean-probs" or task.kind == REGRESSION:
        out[has] = _mean(probs, owner, rows)[has]
    elif rule == "mean-logits":
        out[has] = task.outputs(torch.from_numpy(_mean(logits, owner, rows)[has])).numpy()
    else:  # max-confidence: the window most sure of its verdict (multi-label: per label)
        sure = probs.max(1, keepdims=True) if task.kind == SINGLE else np.abs(probs - 0.5)
        for col in range(sure.shape[1]):
            order = np.lexsort((sure[:, col], owner))  # by row, then by sureness: a row's last is its surest
            last = order[np.r_[owner[order][1:] != owner[order][:-1], True]]
            if task.kind == SINGLE:
                out[owner[last]] = probs[last]
            else:
                out[owner[last], col] = probs[last, col]
    return out, counts


def _mean(values: np.ndarray, owner: np.ndarray, rows: int) -> np.ndarray:
    sums = np.zeros((rows, values.shape[1]), np.float64)
    np.add.at(sums, owner, values)
    return (sums / np.maximum(np.bincount(owner, minlength=rows), 1)[:, None]).astype(np.float32)
