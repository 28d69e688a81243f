"""Scoring throughput: forward-only passes of 16 x 512 tokens keeping only the last position's
logits (what predict.py does at the cue), on a Llama-3-8B-shaped random model, vs the peer.

    python bench/score_speed.py                                  # on a GPU: 8b, int8 and bf16, + peer
    python bench/score_speed.py --peer out/peer.jsonl            # reuse train_speed.py's peer run
    python bench/score_speed.py --size tiny --device cpu --peer skip   # smoke test

The peer (HF + bitsandbytes, `logits_to_keep=1`) times the same unit; its run is shared with
train_speed.py (it writes both kinds of rows), so one peer run serves both benchmarks.
The time is the median of --reps passes after 2 warm-ups; peak memory counts the weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

import kernels  # noqa: E402
from train_speed import (SIZES, bench_config, build_random_model, check_kernels_in_model, fmt, free,  # noqa: E402
                         kernels_in_model, n_params, peer_lookup, peer_rows, sync)


def score_run(cfg, mode: str, device, batch: int, seq: int, reps: int, use_kernels: bool) -> dict:
    t0 = time.perf_counter()
    model = build_random_model(cfg, mode, device)
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    last = torch.full((batch,), seq - 1, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with kernels_in_model(use_kernels), torch.inference_mode():
        for i in range(2 + reps):
            sync(device)
            t = time.perf_counter()
            logits = model(ids, logits_at=last)  # (B, V)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t)
    assert logits.shape == (batch, cfg.vocab_size)
    times.sort()
    med = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, logits
    free(device)
    return dict(mode=mode, kernels="on" if use_kernels else "off", batch=batch, seq=seq, step_s=round(med, 4),
                examples_per_s=round(batch / med, 2), tokens_per_s=round(batch * seq / med, 1),
                peak_gib=None if peak is None else round(peak, 2), build_s=round(build_s, 1))


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to run
    p.add_argument("--size", choices=sorted(SIZES), default="8b" if cuda else "tiny",
                   help="model shape (the peer's: 8b = Llama-3-8B; default 8b on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu")
    p.add_argument("--modes", default="int8,bf16", help="comma-separated bases: int8, nf4, bf16")
    p.add_argument("--kernels", choices=kernels.BACKENDS, default="auto",
                   help="auto/triton: kernels/ patched into the model; torch: the plain model")
    p.add_argument("--baseline-modes", default="", help="also run these modes with --kernels torch")
    # work unit
    p.add_argument("--batch", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--reps", type=int, default=5, help="timed passes (median reported)")
    # peer
    p.add_argument("--peer", default="run", help="run (the peer script as a subprocess), skip, or a peer .jsonl "
                                                 "(e.g. train_speed.py's <out>/peer.jsonl)")
    p.add_argument("--peer-script", help="peer_hf_peft.py (default: .peer/, shared/bench/ or ../shared/bench/)")
    p.add_argument("--peer-path", default="/tmp/rand-llama", help="where the peer saves its random model")
    p.add_argument("--peer-timeout", type=int, default=420, help="seconds before the peer is abandoned")
    # output
    p.add_argument("--out", help="folder for score.json (and peer.jsonl when the peer runs here)")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.baseline_modes = [m for m in args.baseline_modes.split(",") if m]
    for m in args.modes + args.baseline_modes:
        if m not in ("int8", "nf4", "bf16"):
            raise SystemExit(f"--modes: unknown base {m!r} (int8, nf4, bf16)")
    # run_peer passes these on: the peer's --steps is also its number of timed scoring passes.
    args.score_batch, args.steps, args.warmup = args.batch, args.reps, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    kernels.set_backend(args.kernels)
    use_kernels = args.kernels != "torch"
    cfg = bench_config(args.size)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"score_speed: {args.size} ({n_params(cfg) / 1e6:,.1f} M params) on {gpu}, torch {torch.__version__}, "
          f"kernels {args.kernels}", flush=True)
    if use_kernels:
        print(f"kernels_in_model self-check: max relative diff {check_kernels_in_model(device):.2e}", flush=True)

    # The peer always trains too; its --batch is that training batch (kept at 1 here, unused) and
    # its scoring batch is --score-batch (= our --batch).
    peer_args = argparse.Namespace(**{**vars(args), "batch": 1})
    peer = peer_rows(peer_args, sorted(set(args.modes + args.baseline_modes)), out_dir)
    results = []
    for mode, on in [(m, use_kernels) for m in args.modes] + [(m, False) for m in args.baseline_modes]:
        try:
            r = score_run(cfg, mode, device, args.batch, args.seq, args.reps, on)
        except Exception as e:  # noqa: BLE001 -- one failing base must not hide the others
            r = dict(mode=mode, kernels="on" if on else "off", error=repr(e)[:500])
            free(device)
        pr = peer_lookup(peer, "score", mode)
        if pr and (pr.get("batch"), pr.get("seq")) != (args.batch, args.seq):  # another work unit
            print(f"peer score {mode}: batch x seq {pr.get('batch')} x {pr.get('seq')} is not ours; no ratio")
            pr = None
        r["peer_examples_per_s"] = pr.get("examples_per_s") if pr else None
        r["peer_peak_gib"] = pr.get("peak_gib") if pr else None
        r["ratio"] = (round(r["examples_per_s"] / r["peer_examples_per_s"], 3)
                      if r.get("examples_per_s") and r["peer_examples_per_s"] else None)
        results.append(r)
        print(json.dumps(r), flush=True)
        if out_dir:  # after every run: a stage time limit must not lose the finished ones
            (out_dir / "score.json").write_text(json.dumps(dict(size=args.size, gpu=gpu, args=vars(args),
                                                                results=results), indent=1, default=str))

    print(f"\nScoring, {args.size}, {args.batch} x {args.seq} tokens, last-position logits only; {gpu}")
    print(f"{'base':<6} {'kernels':<8} {'pass s':>7} {'examples/s':>10} {'tokens/s':>9} {'peak GiB':>9} | "
          f"{'peer ex/s':>9} {'peer GiB':>9} {'ratio':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<6} {r['kernels']:<8} ERROR {r['error'][:100]}")
            continue
        print(f"{r['mode']:<6} {r['kernels']:<8} {r['step_s']:>7.3f} {r['examples_per_s']:>10.2f} "
              f"{r['tokens_per_s']:>9,.0f} {fmt(r['peak_gib'], '9.2f'):>9} | "
              f"{fmt(r['peer_examples_per_s'], '.2f'):>9} {fmt(r['peer_peak_gib'], '.2f'):>9} "
              f"{fmt(r['ratio'], '.2f'):>6}")
    for r in peer:
        if r.get("kind") == "score" and "error" in r:
            print(f"peer {r['mode']}: ERROR {r['error'][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
