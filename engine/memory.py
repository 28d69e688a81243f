"""How much memory a training step needs, and whether to recompute activations in backward
(gradient checkpointing) to fit: `--grad-checkpointing auto`; the process's peak host memory."""
from __future__ import annotations

import os
import resource
import sys

import torch

AUTO_MARGIN = 0.5  # auto: off only when the extra memory without it is at most half of what is free


def weight_bytes(model) -> int:
    """Bytes of the loaded model: every parameter and buffer (quantized weights as stored)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def estimate_peak_gib(model, cfg, grad_checkpointing: bool) -> float:
    """A deliberately generous estimate of a training step's peak device memory, in GiB: weights
    + adapter training state + activations kept for backward + the head's logits.

    Activations per token and layer: the inputs of every GEMM and elementwise op of a block
    (about 14 x hidden + 5 x intermediate values in the activation dtype) plus the LoRA adapters'
    dropped-out inputs (about 6 x hidden + intermediate): in the activation dtype, but fp32 beside
    fp16 activations (lora/lora.py computes the adapters in fp32 there). With gradient
    checkpointing only each block's input is kept, plus one block's worth during its recompute.
    """
    mc, act = model.cfg, model.activation_dtype.itemsize
    lora_act = 4 if model.activation_dtype == torch.float16 else act
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adam = lora * (4 + 4 + (2 if cfg.optim == "adamw8bit" else 8))  # grad + two moments
    tokens = cfg.batch_size * cfg.max_seq_len
    h, i, layers = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    per_layer = tokens * ((14 * h + 5 * i) * act + (6 * h + i) * lora_act)
    acts = layers * tokens * h * act + per_layer if grad_checkpointing else layers * per_layer
    head = (cfg.batch_size if cfg.loss == "answer" else 1024) * mc.vocab_size * 4 * 2
    return (weight_bytes(model) + adam + acts + head) / 2**30


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (getrusage: KiB on Linux, bytes on
    macOS). Host memory: on a CPU run, what the run took; on CUDA, not the GPU's (peak_gib)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def free_memory_bytes(device: torch.device) -> int:
    """Memory a run could still take: free CUDA memory, or the kernel's MemAvailable on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def total_memory_gib(device: torch.device) -> float:
    """All the memory of the device: the GPU's, or the machine's for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def what_fits(cfg, grad_checkpointing: bool) -> str:
    """What to change after running out of memory: checkpointing (if off), a smaller --batch-size
    with a larger --grad-accum for the same rows per step (the batch's largest divisor), a shorter
    --max-seq-len, or a 4-bit base."""
    advice = [] if grad_checkpointing else ["--grad-checkpointing on"]
    if cfg.batch_size > 1:
        rows = cfg.batch_size * cfg.grad_accum
        fewer = max(d for d in range(1, cfg.batch_size) if cfg.batch_size % d == 0)
        advice.append(f"a smaller --batch-size with a larger --grad-accum for the same {rows} rows per step "
                      f"(--batch-size {fewer} --grad-accum {rows // fewer})")
    return ", ".join(advice + ["a lower --max-seq-len or --precision nf4"])


def decide_grad_checkpointing(model, cfg, device: torch.device) -> tuple[bool, str]:
    """(gradient checkpointing on?, why) for --grad-checkpointing auto|on|off. auto: off when the
    generous estimate of what a step needs beyond the loaded weights, without it, is at most
    AUTO_MARGIN of the free memory; on otherwise (an out-of-memory at step 1 costs more
    than a slower step)."""
    if cfg.grad_checkpointing != "auto":
        return cfg.grad_checkpointing == "on", f"--grad-checkpointing {cfg.grad_checkpointing}"
    need = estimate_peak_gib(model, cfg, grad_checkpointing=False) - weight_bytes(model) / 2**30
    free = free_memory_bytes(device) / 2**30
    on = need > AUTO_MARGIN * free
    return on, f"auto: a step needs ~{need:.1f} GiB without it, {free:.1f} GiB free"
