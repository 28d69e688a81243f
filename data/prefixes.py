"""Rows that start with the same tokens, and which of them compute their common start once.

Every row begins with BOS and the template's instruction, and the rows of one question share
the question too (the embedded GSM8K files hold 4 solutions per question). A batch can then hold
each shared prefix once, as a row of its own, and each example only as its tokens after its
prefix (data/batches.py: collate; model/llama.py: `Llama.hidden(..., prefix_of=)` lets a row
attend to its prefix row). Everything here works on token ids, never on text, so any prompt
template, truncation or tokenizer merge is handled by construction: rows share exactly the ids
they have in common.

Two decisions, both by the work they save:
  plan_groups(ids)      a batch's groups: which rows share which prefix, or None (no sharing)
  family_batches(ids)   scoring only: batches that keep rows with a long common start together

What is "work": a token through a block's projections costs one unit, attention what
model/llama.py's attention_cost says (its pairs, its padded queries, its calls). Unshared, a
batch of B rows runs padded: B x L tokens, and B x L queries over L keys, for its longest row L.
Shared, the projections see each real token once (a prefix once, then the rests; padding
skipped); the first rows (the prefixes, and rows that continue nothing), padded to the longest of
them, attend to themselves, and the rests, in buckets of like length, over [their prefix | their
own] (model/llama.py: Packed). A grouping is used only when it costs less than no sharing and
saves at least MIN_SAVED tokens -- for a batch of one row, or rows with little in common, the
batch stays as it was.
"""
from __future__ import annotations

import numpy as np

from model.llama import attention_cost, like_lengths

MIN_SAVED = 32  # tokens a grouping must save before it is worth doing
FAMILY_MARGIN = 8  # a family shares this many tokens more than what every row of the batch shares


def lcp(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _families(ids: list[list[int]], order: list[int], adjacent: list[int]) -> list[list[int]]:
    """Runs of rows (in lexicographic `order`) that share more than the whole set does: a question
    and its solutions. A row alone joins the neighbour it shares more with."""
    common = min(adjacent) if adjacent else 0
    runs, run = [], [order[0]]
    for k, shared in enumerate(adjacent):
        if shared > common + FAMILY_MARGIN:
            run.append(order[k + 1])
        else:
            runs.append(run)
            run = [order[k + 1]]
    runs.append(run)
    merged: list[list[int]] = []
    for i, r in enumerate(runs):
        if len(r) > 1 or len(runs) == 1:
            merged.append(r)
            continue
        left = lcp(ids[merged[-1][-1]], ids[r[0]]) if merged else -1
        right = lcp(ids[r[0]], ids[runs[i + 1][0]]) if i + 1 < len(runs) else -1
        if left >= right and merged:
            merged[-1].append(r[0])
        elif i + 1 < len(runs):
            runs[i + 1].insert(0, r[0])
        else:
            merged.append(r)
    return merged


def _prefix_lengths(ids: list[list[int]], groups: list[list[int]], targets, ignore: int) -> list[int]:
    """Each group's shared prefix: its rows' common start, short of each row's last token (the cue
    stays in the rest) and of its first target (a prefix holds no target: a shared token's
    prediction would be one for all its rows)."""
    lens = []
    for g in groups:
        if len(g) < 2:
            lens.append(0)
            continue
        p = min(min(lcp(ids[g[0]], ids[r]) for r in g[1:]), min(len(ids[r]) for r in g) - 1)
        if targets is not None:
            p = min([p] + [next((i for i, t in enumerate(targets[r]) if t != ignore), p) for r in g])
        lens.append(p)
    return lens


def _work(ids: list[list[int]], groups: list[list[int]] | None, lens: list[int] | None = None) -> float:
    """The work of a batch (module docstring): unshared (groups None) or shared as `groups`."""
    if groups is None:
        longest = max(len(x) for x in ids)
        return len(ids) * longest + attention_cost(len(ids), longest, longest)
    rests = [(len(ids[r]) - p, p) for p, g in zip(lens, groups) for r in g if p]  # (own tokens, prefix)
    first = [p for p in lens if p] + [len(ids[r]) for p, g in zip(lens, groups) for r in g if not p]
    Ts = max(first)
    work = sum(n for n, _ in rests) + sum(first) + attention_cost(len(first), Ts, Ts)
    for bucket in like_lengths([n for n, _ in rests], [p for _, p in rests]):
        T, P = max(rests[i][0] for i in bucket), max(rests[i][1] for i in bucket)
        work += attention_cost(len(bucket), T, P + T)
    return work


def plan_groups(ids: list[list[int]], targets: list[list[int]] | None = None,
                ignore: int = -100) -> tuple[list[int], list[int]] | None:
    """How a batch shares prefixes: (group of each row, prefix length of each group), or None.

    Candidates: one group of all rows (their common start: the instruction), and the families
    (rows of one question: a group each); the cheaper (module docstring) wins if it beats the
    plain pass and saves MIN_SAVED tokens. `targets` (a row's per-token targets, `ignore` where
    none) keep every target out of the prefixes: with the `full` loss, where every token is a
    target, nothing is shared.
    """
    B = len(ids)
    if B < 2:
        return None
    order = sorted(range(B), key=lambda i: ids[i])
    adjacent = [lcp(ids[order[k]], ids[order[k + 1]]) for k in range(B - 1)]
    best, plain = None, _work(ids, None)
    for groups in ([list(range(B))], _families(ids, order, adjacent)):
        lens = _prefix_lengths(ids, groups, targets, ignore)
        saved, work = sum((len(g) - 1) * p for p, g in zip(lens, groups)), _work(ids, groups, lens)
        if saved >= MIN_SAVED and work < plain and (best is None or work < best[0]):
            best = (work, groups, lens)
    if best is None:
        return None
    _, groups, lens = best
    group_of = [0] * B
    for g, rows in enumerate(groups):
        for r in rows:
            group_of[r] = g
    return group_of, lens


def family_batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Scoring's batches (lists of row indices) that keep each family -- rows with a long common
    start -- together, and put families whose rows' rests are alike side by side, so that little
    of a batch is padding; a family larger than a batch is cut into batch-sized parts."""
    if not ids:
        return []
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    adjacent = [lcp(ids[order[k]], ids[order[k + 1]]) for k in range(len(ids) - 1)]
    families = [sorted(f, key=lambda r: len(ids[r])) for f in _families(ids, order, adjacent)]
    shared = [min((lcp(ids[f[0]], ids[r]) for r in f[1:]), default=0) for f in families]
    rest = [float(np.median([len(ids[r]) - s for r in f])) for f, s in zip(families, shared)]
    flat = [r for _, f in sorted(zip(rest, families), key=lambda x: x[0]) for r in f]
    return [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
