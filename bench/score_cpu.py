"""Scoring on CPU: `engine.score.score` as predict.py runs it, against transformers + PEFT.

Same model folder, adapter and rows for every side; passes interleaved (the order flips each
pass, so machine load hits all sides alike); the first pass of each side is a warm-up (it also
tokenizes the rows) and is not timed. Sides:

  ours                   predict.py's default: the int8 base, activations as `auto` picks
                         (bf16 on a CPU with native bf16, else fp32), shared prefixes, the adapter
                         beside the weights
  ours unshared          the same, --share-prefixes off
  ours fp32 activations  the int8 base in fp32, unshared: predict.py's default before this round
  ours fp32              --precision fp32, the adapter merged into the weights (predict.py does so
                         for fp32): the exact reference, checked against the peer fp32 within --tol
  peer fp32, peer bf16   `LlamaForCausalLM.from_pretrained` at that dtype + `PeftModel.from_pretrained`,
                         then `bench.peer_cpu.peer_score`: the same rows, left-padded, positions from
                         the mask, `logits_to_keep=1`, batches by character length; bf16 weights are
                         the peer's fastest CPU configuration

Each --data file is sampled by question (whole questions, seeded, until --rows rows), so that a
file with several solutions per question keeps them: `data/gsm8k_val.csv` has 4 per question,
`data/realcritic.csv` 1. "tokens computed" counts the real tokens each side's model processes
(a shared prefix once; the peer and unshared sides: every row whole); "row tokens/s" divides the
rows' own tokens by the time, so it compares across sides.

Without --adapter a random one is made (seeded: A as initialised, B ~ N(0, --b-std)) so the
adapter really moves the scores.

Run from the repository root:

    python -m bench.score_cpu                                    # both files, 64 rows each, batch 16
    python -m bench.score_cpu --rows 200 --steps 3
    python -m bench.score_cpu --adapter runs/latest --data data/gsm8k_val.csv
    python -m bench.score_cpu --rows 16 --steps 1 --max-seq-len 256   # smoke test, ~2 min
    python -m bench.score_cpu --steps 4 --sides "ours unshared,peer bf16"   # sharing's ratio, more passes
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
from data.read import question_codes, read_table
from engine.build import build_model
from engine.score import score
from lora.inject import apply_lora, lora_modules
from lora.io import load_adapter, save_adapter
from model.precision import choose_activations

CPU = torch.device("cpu")


def random_adapter(model_dir: Path, out: Path, seed: int, b_std: float, r: int, alpha: float) -> None:
    model = build_model(model_dir, "fp32", CPU)
    torch.manual_seed(seed)
    apply_lora(model, r=r, alpha=alpha, dropout=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    save_adapter(model, out, base_model_name_or_path=str(model_dir))


def by_question(df, rows: int, seed: int):
    """Whole questions, in a seeded order, until `rows` rows (all of them for rows <= 0)."""
    if rows <= 0 or rows >= len(df):
        return df
    codes, n = question_codes(df)
    take, total = [], 0
    for q in np.random.default_rng(seed).permutation(n):
        take.append(q)
        total += int((codes == q).sum())
        if total >= rows:
            break
    return df[np.isin(codes, take)]


SIDES = ("ours", "ours unshared", "ours fp32 activations", "ours fp32", "peer fp32", "peer bf16")


def sides(model_dir: Path, adapter: Path, batch_size: int, label_ids, pad_id: int, names=SIDES):
    """name -> (a pass over a RowDataset returning (p_true, tokens computed)), built once, for
    the sides `names` only."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    def ours(precision, activations, share, merge=False):
        m = load_adapter(build_model(model_dir, precision, CPU, activations), adapter)
        if merge:  # as predict.py does for an fp32 base: W + s·B@A
            for layer in lora_modules(m).values():
                layer.merge()

        def run(ds):
            counts = {}
            return score(m, ds, batch_size, CPU, label_ids, progress=False, share=share, counts=counts), counts["computed"]
        return run

    def peer(dtype):
        hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        pm = PeftModel.from_pretrained(hf, adapter if adapter.is_dir() else adapter.parent).eval()

        def run(ds):
            n = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
            return peer_cpu.peer_score(pm, ds, batch_size, label_ids, pad_id), n
        return run

    build = {"ours": lambda: ours("int8", "auto", True), "ours unshared": lambda: ours("int8", "auto", False),
             "ours fp32 activations": lambda: ours("int8", "fp32", False),
             "ours fp32": lambda: ours("fp32", "auto", True, merge=True),
             "peer fp32": lambda: peer(torch.float32), "peer bf16": lambda: peer(torch.bfloat16)}
    return {name: build[name]() for name in SIDES if name in names}


# Which side each side's p_true is compared with, and why.
REFERENCE = {"ours": "ours unshared", "ours unshared": "ours fp32 activations", "ours fp32": "peer fp32",
             "peer bf16": "peer fp32"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.score_cpu", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="adapter folder or file (default: a random seeded adapter)")
    p.add_argument("--data", nargs="+", default=[str(REPO / "data" / "gsm8k_val.csv"), str(REPO / "data" / "realcritic.csv")],
                   help="files to score, one table block each")
    p.add_argument("--rows", type=int, default=64, help="rows per file: whole questions, seeded (0: all)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (every side)")
    p.add_argument("--max-seq-len", type=int, default=384, help="token limit per row")
    p.add_argument("--steps", type=int, default=2, help="timed passes over the rows per side (after a warm-up pass)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample and the random adapter")
    p.add_argument("--r", type=int, default=32, help="random adapter's rank")
    p.add_argument("--alpha", type=float, default=64, help="random adapter's alpha")
    p.add_argument("--b-std", type=float, default=0.02, help="random adapter's B standard deviation")
    p.add_argument("--sides", default=",".join(SIDES),
                   help=f"comma-separated sides to run (default: all: {', '.join(SIDES)}); 'ours' always runs")
    p.add_argument("--tol", type=float, default=1e-4, help="largest allowed |p_true ours fp32 - peer fp32|")
    add_clock_args(p)
    args = p.parse_args(argv)
    clock = clock_of(args)
    wanted = {"ours"} | {x.strip() for x in args.sides.split(",") if x.strip()}
    if wanted - set(SIDES):
        p.error(f"--sides: unknown {', '.join(sorted(wanted - set(SIDES)))} (choose from {', '.join(SIDES)})")
    from model.default import default_model_dir
    from model.tokenizer import Tokenizer

    model_dir = Path(args.model) if args.model else default_model_dir()
    tok = Tokenizer.from_dir(model_dir)
    label_ids = tok.label_ids()
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="score_cpu-") as tmp:
        adapter = Path(args.adapter) if args.adapter else Path(tmp)
        if not args.adapter:
            random_adapter(model_dir, adapter, args.seed, args.b_std, args.r, args.alpha)
        passes = sides(model_dir, adapter, args.batch_size, label_ids, tok.pad_id, wanted)
    names = list(passes)
    for path in args.data:
        full, _ = read_table(path)
        df = by_question(full, args.rows, args.seed)
        ds = RowDataset(df.reset_index(drop=True), Encoder(tok, DEFAULT_PROMPT, args.max_seq_len, "answer"),
                        pad_id=tok.pad_id)
        per_q = len(df) / question_codes(df)[1]
        times, p_true, computed = {k: [] for k in names}, {}, {}
        for i in range(args.steps + 1):
            for side in names if i % 2 == 0 else names[::-1]:
                t = clock()
                p_true[side], computed[side] = passes[side](ds)
                dt = clock() - t
                if i > 0:
                    times[side].append(dt)
                print(f"{Path(path).name} pass {i} {side}: {dt:.2f} s (load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr, flush=True)
        row_tok = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
        for side in names:
            med = float(np.median(times[side]))
            ref = REFERENCE.get(side) if REFERENCE.get(side) in names else None
            diff = float(np.abs(p_true[side] - p_true[ref]).max()) if ref else None
            same = float(np.mean((p_true[side] > 0.5) == (p_true[ref] > 0.5))) if ref else None
            if side == "ours fp32" and diff is not None:
                ok &= diff <= args.tol
            ratio = {o: float(np.median([b / a for a, b in zip(times[side], times[o])])) if o in names else None
                     for o in SIDES}  # None: a side not run
            rows.append(dict(file=Path(path).name, per_q=per_q, side=side, n=len(ds), s=med, rows_s=len(ds) / med,
                             computed=computed[side], row_tok_s=row_tok / med, ratio=ratio, ref=ref, diff=diff,
                             same=same))

    import peft
    import transformers
    act = choose_activations("int8", CPU, "auto")
    print(f"\nmodel {model_dir.name}; ours' activations: {act[0]} ({act[1]}); {torch.get_num_threads()} threads, clock "
          f"{args.clock}, batch {args.batch_size}, max-seq-len {args.max_seq_len}, adapter "
          f"{args.adapter or f'random (r={args.r}, B std {args.b_std})'}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}\n")
    print("| file (rows per question) | side | rows | pass s | rows/s | tokens computed | row tokens/s "
          "| ours / this | this / ours unshared | this / peer bf16 | this / peer fp32 | max abs dp_true (vs) "
          "| same decision |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rr = {o: "" if x is None else f"{x:.2f}" for o, x in r["ratio"].items()}
        diff = f"{r['diff']:.1e} ({r['ref']})" if r["ref"] else ""
        same = f"{r['same']:.4f}" if r["ref"] else ""
        print(f"| {r['file']} ({r['per_q']:.1f}) | {r['side']} | {r['n']} | {r['s']:.2f} | {r['rows_s']:.2f} "
              f"| {r['computed']:,} | {r['row_tok_s']:.0f} | {1 / r['ratio']['ours']:.2f} | {rr['ours unshared']} "
              f"| {rr['peer bf16']} | {rr['peer fp32']} | {diff} | {same} |")
    if {"ours fp32", "peer fp32"} <= set(names):
        print(f"\nours fp32 against the peer fp32, p_true within {args.tol:g}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
