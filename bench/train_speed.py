"""Training throughput on a Llama-3-8B-shaped model with random weights, against the HF + PEFT peer.

The work unit is the peer's (../shared/bench/README.md): one optimizer step of LoRA SFT, r=32,
alpha=64, dropout 0.1 on q,k,v,o,gate,up,down, batch 4 x 512 tokens, full causal-LM loss,
gradient checkpointing, AdamW. The model is built straight on the GPU one weight at a time
(each projection quantized the moment it is drawn), so host memory stays small. Random weights
cost the same time as real ones. Run from the repository root:

    python -m bench.train_speed                               # on a GPU: 8b, int8/nf4/bf16, + peer
    python -m bench.train_speed --find-max-batch              # largest batch x length in 14 GiB (int8)
    python -m bench.train_speed --size tiny --device cpu --steps 2 --warmup 1   # smoke test

Our step is the library's, the calls train.py's loop makes: engine.loss.accumulate (the loss of
engine.loss.compute_loss -- the head at the cue in answer mode, engine.loss.chunked_cross_entropy
over every position in full mode -- divided by the target count, then backward) and the AdamW of
engine.trainer.make_optimizer. Nothing is patched: model/llama.py and model/quant.py call the
Triton kernels themselves through the kernels switch, set here per run with
`kernels.backend(--kernels)` (default $KERNELS, else auto: Triton on CUDA tensors);
`--baseline-modes int8` adds int8 runs under KERNELS=torch, to show what the kernels buy.
Before the runs a tiny fp32 int8 model checks that the chosen backend leaves logits and LoRA
gradients within 1e-4 (relative) of KERNELS=torch.

Step time is the median over --steps steps after --warmup steps (synchronised); peak memory is
torch.cuda.max_memory_allocated over those steps (weights included). MFU uses the usual
6 x params x tokens/s over --peak-tflops (it ignores the recompute and the missing weight
gradients, as everyone's MFU does).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import kernels
from bench.common import (add_gpu_args, build_random_model, finish_gpu_args, free, gpu_setup,
                          measure_modes, median_time, n_params, peer_rows, print_table)
from data.prompt import IGNORE
from engine.config import TrainConfig
from engine.loss import compute_loss, count_targets
from engine.optim import make_optimizer
from lora.inject import apply_lora


# ----------------------------------------------------------------------------- one run

def work_batch(vocab: int, batch: int, seq: int, loss_mode: str, device, seed: int = 0) -> dict:
    """A batch dict as data/batches.collate makes it, of random tokens, on `device`: full mode
    targets every next token (HF's labels=ids), answer mode one random label token at the last
    position (the cue)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets = torch.full_like(ids, IGNORE)
    if loss_mode == "full":
        targets[:, :-1] = ids[:, 1:]
    else:
        targets[:, -1] = torch.randint(0, vocab, (batch,), generator=gen)
    b = dict(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool), targets=targets,
             cue_pos=torch.full((batch,), seq - 1))
    return {k: v.to(device) for k, v in b.items()}


def with_lora(model, r: int, alpha: float, dropout: float):
    """Adapters on all seven projections (seeded), checkpointing on, training mode; (model, AdamW)."""
    torch.manual_seed(0)
    apply_lora(model, r=r, alpha=alpha, dropout=dropout)
    model.grad_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, make_optimizer(TrainConfig(lr=1e-4, r=r, alpha=alpha, dropout=dropout), params)


def train_step(model, opt, batch: dict, loss_mode: str, device, n_targets: torch.Tensor) -> float:
    """One optimizer step of one micro-batch, as train.py takes it (no clipping: the peer's unit)."""
    loss = compute_loss(model, batch, loss_mode, device) / n_targets
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train_run(cfg, mode: str, device, args) -> dict:
    t0 = time.perf_counter()
    model, opt = with_lora(build_random_model(cfg, mode, device), args.r, args.alpha, args.dropout)
    batch = work_batch(cfg.vocab_size, args.batch, args.seq, args.loss, device)
    n_targets = torch.tensor(float(count_targets([batch])), device=device)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss, med = median_time(lambda: train_step(model, opt, batch, args.loss, device, n_targets),
                            args.warmup, args.steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    tokens_per_s = round(args.batch * args.seq / med, 1)
    out = dict(mode=mode, loss_mode=args.loss, batch=args.batch, seq=args.seq, step_s=round(med, 4),
               tokens_per_s=tokens_per_s, peak_gib=None if peak is None else round(peak, 2), loss=round(loss, 4),
               lora_params=sum(p.numel() for p in model.parameters() if p.requires_grad), build_s=round(build_s, 1),
               mfu=round(6 * n_params(cfg) * tokens_per_s / (args.peak_tflops * 1e12), 4))
    del model, opt, batch
    free(device)
    return out


# ----------------------------------------------------------------------------- max batch

def one_step_peak(model, opt, cfg, batch: int, seq: int, device, loss_mode: str) -> float:
    """Peak GiB of one training step at batch x seq (inf on out-of-memory)."""
    b = work_batch(cfg.vocab_size, batch, seq, loss_mode, device)
    n_targets = torch.tensor(float(count_targets([b])), device=device)
    free(device)
    torch.cuda.reset_peak_memory_stats()
    try:
        train_step(model, opt, b, loss_mode, device, n_targets)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return float("inf")


def find_max_batch(args, cfg, device) -> list[dict]:
    """Per sequence length, the largest batch whose training step peaks within --budget-gib.
    Peak memory is linear in the batch at a fixed length: measure batch 1 and 2, extrapolate,
    then confirm the prediction (and step down while it does not fit)."""
    if device.type != "cuda":
        raise SystemExit("--find-max-batch measures CUDA memory: run it on a GPU")
    model, opt = with_lora(build_random_model(cfg, "int8", device), args.r, args.alpha, args.dropout)
    rows = []

    def peak(b, seq):
        return one_step_peak(model, opt, cfg, b, seq, device, args.loss)

    peak(1, 64)  # Adam state exists from here
    for seq in args.lengths:
        p1, p2 = peak(1, seq), peak(2, seq)
        if p1 > args.budget_gib:
            rows.append(dict(seq=seq, max_batch=0, peak_gib=round(p1, 2), tokens=0))
            print(f"  seq {seq}: even batch 1 peaks at {p1:.2f} GiB", flush=True)
            continue
        b = max(1, int((args.budget_gib - p1) / max(p2 - p1, 1e-6)) + 1)
        got = peak(b, seq)
        while b > 1 and got > args.budget_gib:
            b -= 1
            got = peak(b, seq)
        nxt = peak(b + 1, seq)
        while nxt <= args.budget_gib:  # the extrapolation was short: walk up
            b, got = b + 1, nxt
            nxt = peak(b + 1, seq)
        rows.append(dict(seq=seq, max_batch=b, tokens=b * seq, peak_gib=round(got, 2),
                         next_peak_gib=None if nxt == float("inf") else round(nxt, 2)))
        print(f"  seq {seq}: batch {b} ({b * seq} tokens) peaks at {got:.2f} GiB; batch {b + 1}: "
              f"{'OOM' if nxt == float('inf') else f'{nxt:.2f} GiB'}", flush=True)
    del model, opt
    free(device)
    return rows


# ----------------------------------------------------------------------------- main

COLUMNS = [("step s", "step_s", 7, ".3f"), ("tokens/s", "tokens_per_s", 9, ",.0f"), ("peak GiB", "peak_gib", 9, ".2f"),
           ("MFU", "mfu", 6, ".1%"), "|", ("peer tok/s", "peer_tokens_per_s", 10, ",.0f"),
           ("peer GiB", "peer_peak_gib", 9, ".2f"), ("ratio", "ratio", 6, ".2f")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.split("\n")[0])
    add_gpu_args(p, modes="int8,nf4,bf16")
    p.add_argument("--loss", choices=("full", "answer"), default="full",
                   help="full causal-LM loss (the peer's work unit) or one label token per row")
    # work unit
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--r", type=int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=64, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout")
    p.add_argument("--peak-tflops", type=float, default=814.0,
                   help="bf16 dense peak for MFU, TFLOP/s (814: a measured 8192^3 matmul on the H100)")
    p.add_argument("--score-batch", type=int, default=16, help="passed to the peer (its scoring rows)")
    # max batch
    p.add_argument("--find-max-batch", action="store_true",
                   help="instead of timing: largest batch per length whose int8 step fits --budget-gib")
    p.add_argument("--budget-gib", type=float, default=14.0, help="memory budget for --find-max-batch")
    p.add_argument("--lengths", default="512,1024,2048,4096", help="sequence lengths for --find-max-batch")
    args = finish_gpu_args(p.parse_args(argv))
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, out_dir, cfg, gpu = gpu_setup(args, "train_speed")

    if args.find_max_batch:
        with kernels.backend(args.kernels):
            rows = find_max_batch(args, cfg, device)
        if out_dir:
            (out_dir / "maxbatch.json").write_text(json.dumps(dict(budget_gib=args.budget_gib, rows=rows), indent=1))
        print(f"\nLargest int8 LoRA training step within {args.budget_gib:g} GiB ({args.size}, {args.loss} loss, "
              f"KERNELS={args.kernels}):")
        print(f"{'seq':>6} {'batch':>6} {'tokens':>8} {'peak GiB':>9}")
        for r in rows:
            print(f"{r['seq']:>6} {r['max_batch']:>6} {r['tokens']:>8} {r['peak_gib']:>9.2f}")
        return 0

    # The peer first, on a clean GPU; its rows serve score_speed too (--peer <out>/peer.jsonl).
    peer = peer_rows(args, dict(batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                                score_batch=args.score_batch), out_dir)
    env = next((r for r in peer if r.get("kind") == "env"), {})

    results = measure_modes(args, lambda mode: train_run(cfg, mode, device, args), peer, "train", "tokens_per_s",
                            device, out_dir and out_dir / "train.json",
                            dict(size=args.size, gpu=gpu, args=vars(args), peer_env=env, peer=peer))
    title = (f"\nLoRA training step, {args.size}, batch {args.batch} x {args.seq}, {args.loss} loss, r={args.r}, "
             f"checkpointing, AdamW; {gpu}"
             + (f"; peer bf16 matmul {env['matmul_bf16_tflops']:.0f} TFLOP/s" if env.get("matmul_bf16_tflops") else ""))
    print_table(title, COLUMNS, results, peer, "train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
