"""Scoring throughput: forward-only passes of 16 x 512 tokens keeping only the last position's
logits (what predict.py does at the cue), on a Llama-3-8B-shaped random model, vs the peer.
Run from the repository root:

    python -m bench.score_speed                                  # on a GPU: 8b, int8 and bf16, + peer
    python -m bench.score_speed --peer out/peer.jsonl            # reuse train_speed's peer run
    python -m bench.score_speed --size tiny --device cpu --batch 4 --seq 64 --reps 2 --peer skip   # smoke test

Ours: `model(ids, logits_at=last)`, the library's forward with the head at one position per
row, under `kernels.backend(--kernels)` (default $KERNELS, else auto: Triton on CUDA tensors);
`--baseline-modes int8` adds int8 under KERNELS=torch. The peer (HF + bitsandbytes,
`logits_to_keep=1`) times the same unit; its run is shared with train_speed (it writes both
kinds of rows), so one peer run serves both benchmarks. The time is the median of --reps passes
after 2 warm-ups; peak memory counts the weights.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import (add_gpu_args, build_random_model, finish_gpu_args, free, gpu_setup,
                          measure_modes, median_time, peer_rows, print_table)


def score_run(cfg, mode: str, device, batch: int, seq: int, reps: int) -> dict:
    t0 = time.perf_counter()
    model = build_random_model(cfg, mode, device)
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    last = torch.full((batch,), seq - 1, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        logits, med = median_time(lambda: model(ids, logits_at=last), 2, reps, device)  # (B, V)
    assert logits.shape == (batch, cfg.vocab_size)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, logits
    free(device)
    return dict(mode=mode, batch=batch, seq=seq, step_s=round(med, 4), examples_per_s=round(batch / med, 2),
                tokens_per_s=round(batch * seq / med, 1), peak_gib=None if peak is None else round(peak, 2),
                build_s=round(build_s, 1))


COLUMNS = [("pass s", "step_s", 7, ".3f"), ("examples/s", "examples_per_s", 10, ".2f"),
           ("tokens/s", "tokens_per_s", 9, ",.0f"), ("peak GiB", "peak_gib", 9, ".2f"), "|",
           ("peer ex/s", "peer_examples_per_s", 9, ".2f"), ("peer GiB", "peer_peak_gib", 9, ".2f"),
           ("ratio", "ratio", 6, ".2f")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.score_speed", description=__doc__.split("\n")[0])
    add_gpu_args(p, modes="int8,bf16")
    p.add_argument("--batch", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--reps", type=int, default=5, help="timed passes (median reported)")
    return finish_gpu_args(p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    device, out_dir, cfg, gpu = gpu_setup(args, "score_speed")
    # The peer always trains too; its --batch is that training batch (kept at 1 here, unused), its
    # scoring batch is --score-batch (= our --batch) and its --steps the number of timed passes.
    peer = peer_rows(args, dict(batch=1, seq=args.seq, steps=args.reps, warmup=1, score_batch=args.batch), out_dir)

    results = measure_modes(args, lambda mode: score_run(cfg, mode, device, args.batch, args.seq, args.reps),
                            peer, "score", "examples_per_s", device, out_dir and out_dir / "score.json",
                            dict(size=args.size, gpu=gpu, args=vars(args)))
    print_table(f"\nScoring, {args.size}, {args.batch} x {args.seq} tokens, last-position logits only; {gpu}",
                COLUMNS, results, peer, "score")
    return 0


if __name__ == "__main__":
    sys.exit(main())
