"""Scoring: p_true for each row, the metrics of p_true against labels, the tuned threshold,
training's evaluation, and adapter ensembles.

One forward pass per batch, no generation: at the cue ("Answer is correct (True/False only):")
the model's logits for " True" and " False" are compared, p_true = softmax(logit(False),
logit(True))[1]. The vocabulary head runs at that one position only, and only its two label rows,
in fp32. train.py's evaluation and
predict.py both score with `score`, so validation numbers and predictions come from one code path.
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from common.errors import UserError
from data.batches import RowDataset, collate, row_tokens
from data.prefixes import family_batches
from engine.loss import hidden_states
from lora.inject import lora_modules, remove_lora
from lora.io import load_adapter


class ScoringStopped(Exception):
    """`score` gave up between two batches because its `should_stop()` said so."""


@torch.no_grad()
def score(model, ds: RowDataset, batch_size: int, device, label_ids: tuple[int, int],
          progress: bool = True, chunk_rows: int = 1024, share: bool = True, counts: dict | None = None,
          should_stop=None) -> np.ndarray:
    """p_true for every row of `ds`, in row order.

    Rows are tokenized `chunk_rows` at a time and each chunk cut into batches. share (the
    default): rows of one question go into the same chunk and batch, so that what they have in
    common -- the instruction, the question -- is computed once per batch (data/prefixes.py);
    p_true is the same as without, to float rounding. Without: rows go in order of character
    length, and each chunk is re-sorted by token count, so that little of a batch is padding.
    counts: if given, gets `row_tokens` (the rows' real tokens) and `computed` (the real tokens the
    model computed: shared prefixes once) added to it. should_stop: a callable asked before each
    batch; when it returns True, ScoringStopped is raised (train.py: Ctrl-C during an evaluation,
    which has nothing to save, so it is abandoned rather than finished).
    """
    was_training = model.training
    model.eval()
    if share:  # a question's rows side by side (a cheap hint: the grouping itself is by token ids)
        order = np.lexsort((ds.lengths, pd.factorize(ds.df["question"].map(str))[0]))
    else:
        order = np.argsort(ds.lengths, kind="stable")
    chunk_rows = max(batch_size, chunk_rows // batch_size * batch_size)  # whole batches per chunk
    p_true = np.zeros(len(ds), dtype=np.float64)
    t_id, f_id = label_ids
    # Only two rows of the vocabulary head matter here, so they are computed in fp32 whatever the
    # activations: bf16 logits (~20 in size) would round to steps of 1/8, and p_true with them.
    head = model.output_weight[[f_id, t_id]].float()  # (2, D)
    bar = tqdm(total=len(ds), desc="score", unit="row", disable=not progress, leave=False, file=sys.stderr)
    for c in range(0, len(order), chunk_rows):
        part = order[c:c + chunk_rows]
        examples = ds.get_batch(part)  # tokenizes the chunk
        ids = [ex["input_ids"] for ex in examples]
        batches = family_batches(ids, batch_size) if share else \
            np.array_split(np.argsort([len(x) for x in ids], kind="stable"), range(batch_size, len(ids), batch_size))
        for sel in batches:
            if should_stop is not None and should_stop():
                bar.close()
                model.train(was_training)
                raise ScoringStopped
            b = collate([examples[j] for j in sel], ds.pad_id, share)
            if counts is not None:
                counts["row_tokens"] = counts.get("row_tokens", 0) + row_tokens(b)
                counts["computed"] = counts.get("computed", 0) + int(b["attention_mask"].sum())
            h = hidden_states(model, b, device)  # (rows, T, D): row j is example sel[j] (then any prefix rows)
            h = h[torch.arange(len(sel), device=device), b["cue_pos"][:len(sel)].to(device)]  # (B, D): at the cue
            two = h.float() @ head.t()  # (B, 2): the logits of " False" and " True", in fp32
            p_true[part[sel]] = torch.softmax(two, -1)[:, 1].cpu().double().numpy()
            bar.update(len(sel))
    bar.close()
    model.train(was_training)
    return p_true


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg), ties counted half. NaN when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = np.asarray(scores)[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(labels: np.ndarray, p_true: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 (True is the positive class: p_true > threshold),
    confusion matrix, ROC-AUC."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(p_true) > threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(n=len(y), accuracy=(tp + tn) / max(len(y), 1), precision=precision, recall=recall, f1=f1,
                auc=_finite_or_none(roc_auc(y, p_true)), confusion={"tp": tp, "fp": fp, "fn": fn, "tn": tn})


# Fewer validation rows than this and a tuned threshold is mostly noise: the accuracy's standard
# error is about sqrt(0.25 / n), 3.5 points at n = 200, more than tuning usually gains; below it,
# the adapter keeps 0.5.
MIN_TUNE_ROWS = 200


def best_threshold(labels: np.ndarray, p_true: np.ndarray) -> tuple[float, float]:
    """(t, accuracy) for the cut `p_true > t` with the highest accuracy on these rows; of equally
    good cuts, the one nearest 0.5. Candidates: 0.5 and the midpoints between distinct scores
    (and just below the lowest / above the highest)."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(p_true, dtype=np.float64)
    u = np.unique(p)
    cuts = np.concatenate([[0.5, u[0] - 1e-12, u[-1]], (u[:-1] + u[1:]) / 2])
    # correct(t) = #positives above t + #negatives at or below t, from sorted scores
    sp, sn = np.sort(p[y]), np.sort(p[~y])
    correct = (len(sp) - np.searchsorted(sp, cuts, side="right")) + np.searchsorted(sn, cuts, side="right")
    best = correct.max()
    cands = cuts[correct == best]
    t = float(cands[np.argmin(np.abs(cands - 0.5))])
    return t, float(best / max(len(y), 1))


def _finite_or_none(x: float) -> float | None:
    return x if np.isfinite(x) else None  # JSON has no NaN: an undefined AUC is null


def format_metrics(m: dict) -> str:
    c = m["confusion"]
    auc = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
    return (f"n={m['n']} acc={m['accuracy']:.4f} auc={auc} P={m['precision']:.3f} "
            f"R={m['recall']:.3f} F1={m['f1']:.3f} [tp={c['tp']} fp={c['fp']} fn={c['fn']} tn={c['tn']}]")


class NonFiniteScores(UserError):
    """An evaluation whose p_true is NaN or infinite for some rows: no metric of it means anything."""


def evaluate(model, val_ds: RowDataset, batch_size: int, device, label_ids, step: int, log,
             share: bool = True, should_stop=None) -> tuple[dict, dict]:
    """Training's evaluation: validation metrics at `step` (at the 0.5 cut) and the tuned decision
    threshold, logged (`log`: engine/log.py's MetricsLog) and printed. The threshold is
    {"threshold": t or None below MIN_TUNE_ROWS rows, "rows": n, "accuracy_at_threshold",
    "best_cut"}. should_stop: as score's (ScoringStopped; nothing logged)."""
    p = score(model, val_ds, batch_size, device, label_ids, share=share, should_stop=should_stop)
    bad = int((~np.isfinite(p)).sum())
    if bad:  # NaN > t is False for every t: these rows would count as predicted False, silently
        raise NonFiniteScores(f"step {step}: the model gave non-finite p_true for {bad} of {len(p)} validation rows")
    y = val_ds.df["is_correct"].to_numpy()
    m = metrics(y, p)
    cut, acc = best_threshold(y, p)
    th = {"threshold": cut if len(y) >= MIN_TUNE_ROWS else None, "rows": len(y), "best_cut": cut,
          "accuracy_at_threshold": acc}
    log({"step": step, "eval": m, "threshold": th})
    note = "" if th["threshold"] is not None else f", not used: fewer than {MIN_TUNE_ROWS} rows"
    tqdm.write(f"step {step:>5} validation: {format_metrics(m)}\n"
               f"           tuned threshold {cut:.4f}: acc={acc:.4f} on these {len(y)} rows{note}", file=sys.stderr)
    return m, th


def score_adapters(model, adapters: list, ds: RowDataset, batch_size: int, device, label_ids: tuple[int, int],
                   merge: bool = False, on_loaded=None, share: bool = True, counts: dict | None = None
                   ) -> np.ndarray:
    """p_true of the base `model` with each adapter in turn, averaged (the base alone without any).

    The base is loaded once; each adapter is put on it, scored and taken off again. An ensemble
    averages probabilities, not log-odds: one over-confident member (p = 1e-6) then moves the
    mean by at most 1/n instead of deciding it. merge: fold a single adapter into an fp32 base's
    weights first (exact to float rounding there; a bf16 weight would round most of a small update
    away, and an int8 or nf4 weight cannot take it without re-quantizing). on_loaded(i): called
    once adapter i is in place, or with None before the base alone is scored.
    """
    if not adapters:
        if on_loaded:
            on_loaded(None)
        return score(model, ds, batch_size, device, label_ids, share=share, counts=counts)
    total = np.zeros(len(ds))
    for i, a in enumerate(adapters):
        load_adapter(model, a)
        if on_loaded:
            on_loaded(i)
        if merge:  # W + s·B@A in the fp32 weights: the plain base's speed
            for m in lora_modules(model).values():
                m.merge()
        model.to(device).eval()
        total += score(model, ds, batch_size, device, label_ids, share=share, counts=counts if i == 0 else None)
        if len(adapters) > 1:
            remove_lora(model)
    return total / len(adapters)
