"""The optimizer and the learning-rate schedule."""
from __future__ import annotations

import math

import torch


def make_optimizer(cfg, params: list) -> torch.optim.Optimizer:
    """AdamW over the adapter parameters (bitsandbytes' AdamW8bit with --optim adamw8bit)."""
    if cfg.optim == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def get_lr(step: int, *, lr: float, steps: int, warmup: int, scheduler: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if scheduler == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    if scheduler == "linear":
        return lr * max(0.0, 1 - progress)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
