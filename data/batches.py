"""Batches: length-grouped, seeded, resumable order over a table's rows, tokenized lazily and
right-padded into the tensors the model takes.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pandas as pd
import torch

from data.prefixes import plan_groups
from data.prompt import IGNORE, Encoder


def char_lengths(df: pd.DataFrame) -> np.ndarray:
    """Cheap length proxy for bucketing: characters of question + solution + answer."""
    def n(col):
        s = df[col]
        if s.dtype == object:  # read_table's columns: map(len) beats .str.len() by ~4x
            try:
                return np.fromiter(map(len, s.to_numpy()), np.int64, len(s))
            except TypeError:  # a non-string value (NaN) somewhere
                pass
        return s.str.len().fillna(0).to_numpy(np.int64)
    return n("question") + n("solution") + n("answer")


class LengthGroupedSampler:
    """Batches of row positions with similar lengths, in a seeded, resumable, infinite order.

    Each epoch: permute all rows (seed + epoch), cut into mega-batches of `mega_batches`
    batches, sort each mega-batch by length (longest first), cut into batches, shuffle the
    batch order. Batches are homogeneous in length (little padding) yet the order is random.
    With `questions` (each row's question number: train.py --group-by-question) the rows of a
    question stay side by side -- questions permuted, rows in random order within each, a
    mega-batch sorted by its questions' mean length -- so that a batch holds few questions and
    its rows share them (data/prefixes.py).
    With world_size > 1 every rank walks the same global order and takes every
    world_size-th batch starting at `rank`; the tail that would give ranks unequal counts is
    dropped, so all ranks take the same number of steps.
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mega_batches: int = 64, questions=None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.questions = None if questions is None else np.asarray(questions, dtype=np.int64)
        if self.questions is not None:
            n = np.bincount(self.questions)
            self._question_len = np.bincount(self.questions, weights=self.lengths) / np.maximum(n, 1)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.mega_batches = mega_batches
        self.epoch, self.position = 0, 0
        self._cached = (None, None)
        if len(self) == 0:
            raise ValueError(f"{len(self.lengths)} rows give no batch of {batch_size} "
                             f"for each of {world_size} rank(s)")

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return -(-len(self.lengths) // self.batch_size) // self.world_size

    def _global(self, epoch: int) -> list[np.ndarray]:
        bs = self.batch_size
        rng = np.random.default_rng(self.seed + epoch)
        if self.questions is None:
            perm, key = rng.permutation(len(self.lengths)), -self.lengths
        else:  # rows by their question's place in this epoch, then at random
            place = rng.permutation(len(self._question_len))[self.questions]
            perm = np.lexsort((rng.random(len(place)), place))
            key = -self._question_len[self.questions]  # equal within a question: the sort keeps it whole
        mega = bs * self.mega_batches
        batches = []
        for s in range(0, len(perm), mega):
            chunk = perm[s:s + mega]
            chunk = chunk[np.argsort(key[chunk], kind="stable")]
            batches += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order."""
        if self._cached[0] != epoch:
            g = self._global(epoch)
            mine = g[self.rank:len(self) * self.world_size:self.world_size]
            self._cached = (epoch, [b.tolist() for b in mine])
        return self._cached[1]

    def next_batch(self) -> list[int]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.epoch_batches(self.epoch)[self.position]
        self.position += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._cached = (None, None)


def collate(examples: list[dict], pad_id: int, share: bool = False) -> dict:
    """Right-pad examples into the batch dict the trainer and predictor consume: row b is
    examples[b].

    share: rows that start with the same tokens compute them once (data/prefixes.py decides
    which, and whether it pays). Row b then holds only example b's tokens after its prefix, and
    each prefix is a row of its own after the examples' rows; `prefix_of` (rows,) names, for each
    row, the prefix row it continues (-1: none). Prefix rows carry no targets."""
    plan = plan_groups([e["input_ids"] for e in examples], [e["targets"] for e in examples], IGNORE) \
        if share else None
    if plan is None:
        return _pad([e["input_ids"] for e in examples], [e["targets"] for e in examples], pad_id)
    group_of, lens = plan
    B, cut = len(examples), [lens[g] for g in group_of]
    first = {g: b for b, g in reversed(list(enumerate(group_of)))}  # a row holding each group's prefix
    shared = [g for g in range(len(lens)) if lens[g]]  # a group of one row shares nothing: no prefix row
    row_of = {g: B + i for i, g in enumerate(shared)}
    prefixes = [examples[first[g]]["input_ids"][:lens[g]] for g in shared]
    batch = _pad([e["input_ids"][c:] for e, c in zip(examples, cut)] + prefixes,
                 [e["targets"][c:] for e, c in zip(examples, cut)] + [[IGNORE] * len(p) for p in prefixes], pad_id)
    batch["prefix_of"] = torch.tensor([row_of.get(g, -1) for g in group_of] + [-1] * len(prefixes), dtype=torch.long)
    return batch


def row_tokens(batch: dict) -> int:
    """The real tokens of a batch's examples, each one's shared prefix counted in full (as unshared)."""
    n = batch["attention_mask"].sum(-1)  # (rows,)
    if "prefix_of" not in batch:
        return int(n.sum())
    p = batch["prefix_of"]
    example = torch.ones_like(p, dtype=torch.bool)
    example[p[p >= 0]] = False  # a row some row continues is a prefix, not an example
    return int((n + torch.where(p >= 0, n[p.clamp(min=0)], 0))[example].sum())


def _pad(ids: list[list[int]], targets: list[list[int]] | None, pad_id: int) -> dict:
    B, T = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    out_targets = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, x in enumerate(ids):
        input_ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, :len(x)] = True
        if targets is not None:
            out_targets[b, :len(x)] = torch.tensor(targets[b], dtype=torch.long)
    return {
        "input_ids": input_ids,  # (B, T)
        "attention_mask": mask,  # (B, T) True on real tokens
        "targets": out_targets,  # (B, T) -100 where no loss
        "cue_pos": mask.sum(1) - 1,  # (B,) last real token = the cue
    }


class RowDataset:
    """A table's rows, tokenized lazily (with a small LRU cache) when a batch asks for them.

    Positions are 0..len-1 in df's order. `lengths` is the cheap character-length proxy per
    position, for LengthGroupedSampler. `stats` counts the rows
    encoded so far and how many of them were truncated."""

    def __init__(self, df: pd.DataFrame, encoder: Encoder, pad_id: int | None = None,
                 cache_size: int = 4096):
        self.df = df
        self.encoder = encoder
        self.pad_id = encoder.tok.pad_id if pad_id is None else pad_id
        self.lengths = char_lengths(df)
        self.cache_size = cache_size
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._seen = np.zeros(len(df), dtype=bool)
        self._truncated = np.zeros(len(df), dtype=bool)

    def __len__(self) -> int:
        return len(self.df)

    def get_batch(self, positions) -> list[dict]:
        positions = [int(i) for i in positions]
        missing = [i for i in dict.fromkeys(positions) if i not in self._cache]
        if missing:
            rows = self.df.iloc[missing][["question", "answer", "solution", "label"]].to_dict("records")
            for i, ex in zip(missing, self.encoder.encode_many(rows)):
                self._seen[i] = True
                self._truncated[i] = ex["truncated"]
                self._cache[i] = ex
        out = []
        for i in positions:
            self._cache.move_to_end(i)
            out.append(self._cache[i])
        while len(self._cache) > max(self.cache_size, len(positions)):
            self._cache.popitem(last=False)
        return out

    def __getitem__(self, i: int) -> dict:
        return self.get_batch([i])[0]

    def batch(self, positions, share: bool = False) -> dict:
        """collate(get_batch(positions), share=share) with the tokenizer's pad id."""
        return collate(self.get_batch(positions), self.pad_id, share)

    @property
    def stats(self) -> dict:
        return {"rows": len(self), "encoded": int(self._seen.sum()),
                "truncated": int(self._truncated.sum())}
