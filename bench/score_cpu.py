"""Scoring on CPU: `engine.score.score` against transformers + PEFT, same model, adapter, rows.

Ours: `engine.build.build_model` (fp32) with the adapter merged into the weights, as predict.py
does for fp32, then `engine.score.score` (batches by token count, right padding, the head at each
row's cue only); "ours unmerged" keeps the adapter beside the weights, as training's evaluation
does. The peer: `LlamaForCausalLM.from_pretrained` (fp32) + `PeftModel.from_pretrained` on the
same adapter folder, then `bench.peer_cpu.peer_score`: the same rows, left-padded, positions from
the mask, `logits_to_keep=1`, batches by character length (what predict.py did before it sorted
by tokens; a plain loop over unsorted rows would pad more). Both give p_true = softmax over the
logits of " True" and " False" at the cue; the script checks they agree within --tol.

Without --adapter a random one is made (seeded: A as initialised, B ~ N(0, --b-std)) so the
adapter really moves the scores. Passes alternate ours, peer, peer, ours, ...; the first pass of
each side is a warm-up (it also tokenizes the rows) and is not timed.

Run from the repository root:

    python -m bench.score_cpu                                    # 200 validation rows, batch 16
    python -m bench.score_cpu --rows 64 --steps 2                # the README's scoring table
    python -m bench.score_cpu --adapter runs/latest --rows 500
    python -m bench.score_cpu --rows 16 --steps 1 --max-seq-len 256   # smoke test, < 1 min
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import peer_cpu
from bench.common import REPO, add_clock_args, clock_of
from data.batches import RowDataset
from data.prompt import DEFAULT_PROMPT, Encoder
from data.read import read_table
from engine.build import build_model
from engine.score import score
from lora.inject import apply_lora, lora_modules
from lora.io import load_adapter, save_adapter


def random_adapter(model_dir: Path, out: Path, seed: int, b_std: float, r: int, alpha: float) -> None:
    model = build_model(model_dir, "fp32", torch.device("cpu"))
    torch.manual_seed(seed)
    apply_lora(model, r=r, alpha=alpha, dropout=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    save_adapter(model, out, base_model_name_or_path=str(model_dir))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.score_cpu", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="adapter folder or file (default: a random seeded adapter)")
    p.add_argument("--data", default=str(REPO / "data" / "gsm8k_val.csv"), help="rows to score")
    p.add_argument("--rows", type=int, default=200, help="score a seeded sample of this many rows (0: all)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (both sides)")
    p.add_argument("--max-seq-len", type=int, default=384, help="token limit per row")
    p.add_argument("--steps", type=int, default=3, help="timed passes over the rows per side (after a warm-up pass)")
    p.add_argument("--seeds", default="0", help="seed(s) of the row sample and the random adapter; one table row each")
    p.add_argument("--r", type=int, default=32, help="random adapter's rank")
    p.add_argument("--alpha", type=float, default=64, help="random adapter's alpha")
    p.add_argument("--b-std", type=float, default=0.02, help="random adapter's B standard deviation")
    p.add_argument("--tol", type=float, default=1e-4, help="largest allowed |p_true ours - p_true peer|")
    add_clock_args(p)
    args = p.parse_args(argv)
    clock = clock_of(args)
    from model.default import default_model_dir
    from model.tokenizer import Tokenizer
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model_dir = Path(args.model) if args.model else default_model_dir()
    tok = Tokenizer.from_dir(model_dir)
    label_ids, cpu = tok.label_ids(), torch.device("cpu")
    full, _ = read_table(args.data)
    rows, ok = [], True
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        df = full.sample(n=args.rows, random_state=seed).sort_index() if 0 < args.rows < len(full) else full
        ds = RowDataset(df.reset_index(drop=True), Encoder(tok, DEFAULT_PROMPT, args.max_seq_len, "answer"),
                        pad_id=tok.pad_id)
        with tempfile.TemporaryDirectory(prefix="score_cpu-") as tmp:
            adapter = Path(args.adapter) if args.adapter else Path(tmp)
            if not args.adapter:
                random_adapter(model_dir, adapter, seed, args.b_std, args.r, args.alpha)
            ours = load_adapter(build_model(model_dir, "fp32", cpu), adapter)
            for m in lora_modules(ours).values():  # as predict.py: one adapter folded into fp32 weights
                m.merge()
            unmerged = load_adapter(build_model(model_dir, "fp32", cpu), adapter)
            hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
            folder = adapter if adapter.is_dir() else adapter.parent
            pm = PeftModel.from_pretrained(hf, folder).eval()
        passes = {"ours": lambda: score(ours, ds, args.batch_size, cpu, label_ids, progress=False),
                  "peer": lambda: peer_cpu.peer_score(pm, ds, args.batch_size, label_ids, tok.pad_id),
                  "ours unmerged": lambda: score(unmerged, ds, args.batch_size, cpu, label_ids, progress=False)}
        sides = list(passes)
        times, p_true = {k: [] for k in sides}, {}
        for i in range(args.steps + 1):
            for side in sides if i % 2 == 0 else sides[::-1]:
                t = clock()
                p_true[side] = passes[side]()
                dt = clock() - t
                if i > 0:
                    times[side].append(dt)
                print(f"seed {seed} pass {i} {side}: {dt:.2f} s (load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr, flush=True)
        n_tok = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
        for side in sides:
            diff = float(np.abs(p_true[side] - p_true["peer"]).max())
            agree = float(np.mean((p_true[side] > 0.5) == (p_true["peer"] > 0.5)))
            ok &= diff <= args.tol
            med = float(np.median(times[side]))
            rows.append(dict(side=side, seed=seed, n=len(ds), s=med, rows_s=len(ds) / med, tok_s=n_tok / med,
                             ratio=float(np.median([o / q for o, q in zip(times["peer"], times[side])])),
                             diff=diff, agree=agree))
        del ours, unmerged, pm, hf

    import peft
    import transformers
    print(f"\nmodel {model_dir.name}, fp32, {torch.get_num_threads()} threads, clock {args.clock}, batch {args.batch_size}, "
          f"max-seq-len {args.max_seq_len}, adapter {args.adapter or f'random (r={args.r}, B std {args.b_std})'}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}\n")
    print("| side | seed | rows | pass s (median) | rows/s | tokens/s | rows/s vs peer | max abs dp_true vs peer | same decision |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["side"] != "peer" else ""
        print(f"| {r['side']} | {r['seed']} | {r['n']} | {r['s']:.2f} | {r['rows_s']:.2f} | {r['tok_s']:.0f} | {ratio} "
              f"| {r['diff']:.2e} | {r['agree']:.4f} |")
    print(f"\np_true agreement within {args.tol:g}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
