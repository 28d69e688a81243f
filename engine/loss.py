"""The training loss: cross-entropy on the target tokens, summed (`compute_loss`); train.py's loop
divides it by the target count of the whole accumulation window (of all ranks, `count_targets`),
so 2 x batch 2 gives the gradient of 1 x batch 4, whatever the row lengths.

Two modes (data/prompt.py makes the targets):
  answer  the label token at the cue only; the vocabulary head runs at one position per row
  full    every next prompt token and the label, through `chunked_cross_entropy`

Llama 3's head is 128,256 wide: a 4 x 512-token batch has 1 GiB of fp32 logits (plus their bf16
copy and the gradient of each). `chunked_cross_entropy` walks the tokens in chunks instead:
logits of one chunk -> fp32 -> summed CE; the backward pass recomputes each chunk's logits
(one more head matmul) rather than keep them. Rows whose target is `ignore_index` are dropped
before the matmul. `cross_entropy_torch`, the plain full-logits computation, is its reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data.prompt import IGNORE

_CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk: 256 MiB (512 tokens at a 128k vocabulary)


def cross_entropy_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: all logits at once. Returns (sum of token losses (fp32), number of targets)."""
    logits = F.linear(hidden.to(weight.dtype), weight).float()  # (N, V)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss, (targets != ignore_index).sum()


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s:s + chunk], weight).float()  # (c, V)
            loss += F.cross_entropy(logits, targets[s:s + chunk], reduction="sum")
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            p = torch.softmax(F.linear(h, weight).float(), dim=-1)  # (c, V) fp32
            p[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # d(sum CE)/d logits = p - onehot
            dlogits = (p * grad).to(hidden.dtype)  # the cast autograd does for `.float()`
            if need_h:
                dh[s:s + ctx.chunk] = dlogits @ weight
            if need_w:
                dw += (dlogits.t() @ h).float()  # (V, D)
        return dh, None if dw is None else dw.to(weight.dtype), None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int = IGNORE, chunk: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk.

    Args:
        hidden: (N, D) final-normed hidden states (any float dtype; flatten (B, T, D) first).
        weight: (V, D) output head (`model.output_weight`), usually frozen.
        targets: (N,) long; `ignore_index` rows are skipped entirely.
        ignore_index: target value that contributes neither loss nor gradient.
        chunk: tokens per logits chunk; default keeps each chunk's fp32 logits near 256 MiB.
    Returns:
        (loss_sum, count): fp32 scalar SUM of the token losses (differentiable w.r.t. hidden and
        weight) and the long scalar number of counted targets. Divide by the count of the whole
        accumulation window, not per micro-batch (train.py's loop); for a per-batch mean,
        `loss_sum / count.clamp(min=1)`.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: want hidden (N, D) and targets (N,), got "
                         f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
    keep = targets != ignore_index
    count = keep.sum()
    if not bool(keep.all()):  # one host sync; saves the head matmul on every ignored row
        idx = keep.nonzero().squeeze(1)
        hidden, targets = hidden.index_select(0, idx), targets.index_select(0, idx)
    if hidden.shape[0] == 0:  # nothing to predict: a zero that still connects to the graph
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float(), count
    if hidden.dtype != weight.dtype:  # as Llama.logits: the head's dtype decides
        hidden = hidden.to(weight.dtype)
    chunk = chunk or max(1, _CHUNK_ELEMENTS // weight.shape[0])
    return _ChunkedCE.apply(hidden, weight, targets, chunk), count


def hidden_states(model, batch: dict, device) -> torch.Tensor:
    """The final hidden states (rows, T, D) of a batch from data/batches.py: collate; row b is
    example b. When examples share prefixes, each prefix is a row after theirs, computed once in
    the same pass (`Llama.hidden(..., prefix_of=)`): the same numbers as the whole rows."""
    prefix_of = batch.get("prefix_of")
    return model.hidden(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                        None if prefix_of is None else prefix_of.to(device))


def compute_loss(model, batch: dict, loss_mode: str, device) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (fp32)."""
    targets = batch["targets"].to(device)
    h = hidden_states(model, batch, device)  # (rows, T, D); a shared prefix's row has no target
    if loss_mode == "answer":  # one target per row, at the cue: the head runs there only
        cue = batch["cue_pos"].to(device)
        rows = torch.arange(h.shape[0], device=device)
        logits = model.logits(h[rows, cue])  # (B, V)
        return F.cross_entropy(logits.float(), targets[rows, cue], reduction="sum")
    total, _ = chunked_cross_entropy(h.reshape(-1, h.shape[-1]), model.head_weight(), targets.reshape(-1))
    return total


def count_targets(batches: list[dict]) -> int:
    """Target tokens of an accumulation window (this rank's micro-batches)."""
    return sum(int((b["targets"] != IGNORE).sum()) for b in batches)
