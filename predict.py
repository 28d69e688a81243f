"""Score rows with base + LoRA adapter and write the contest's submission file.

    python predict.py --adapter runs/default/adapter_model.safetensors --data test.csv

One forward pass per batch, no generation: at the cue ("Answer is correct (True/False only):")
the model's logits for " True" and " False" are compared; p_true is their two-way softmax
(engine/score.py, which training's evaluation uses too). Rows are batched by length and written
back in the input's order: one submission line per input row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from data.batches import RowDataset
from data.prompt import DEFAULT_PROMPT, Encoder, load_prompt
from data.read import read_table
from engine.build import adapter_run_args, build_model, resolve_device
from engine.cli import UserError, run_cli
from engine.files import atomic_write
from engine.score import format_metrics, metrics, score
from model.default import default_model_dir
from model.precision import PRECISIONS, default_precision
from model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data" / "gsm8k_val.csv"
FALLBACK = False  # the prediction written for a row skipped with --skip-bad-rows (most rows are wrong)


# ----------------------------------------------------------------------------- scoring

# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to score
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", help="where the default model is converted and kept")
    p.add_argument("--adapter", help="adapter_model.safetensors or its folder (omit to score the base model)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CSV / Parquet / JSONL with question, answer, solution")
    p.add_argument("--skip-bad-rows", action="store_true", help=f"skip bad rows (predicted {FALLBACK}) instead of stopping")
    # prompt
    p.add_argument("--prompt-file", help="prompt template with {question} {answer} {solution} (default: the adapter's, else built-in)")
    p.add_argument("--max-seq-len", type=int, help="token limit per row (default: the adapter's, else 512)")
    # compute
    p.add_argument("--precision", choices=PRECISIONS,
                   help="base weights (default: int8 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    # outputs
    p.add_argument("--out", default="submission.csv", help="submission file: ID,is_correct")
    p.add_argument("--probs", action="store_true", help="add a p_true column to the submission")
    p.add_argument("--metrics", help="write metrics JSON here (when the data has is_correct)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as {out / 'submission.csv'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after scoring
    except OSError as e:
        raise UserError(f"--out {out}: cannot create its folder ({e.strerror})") from None
    if args.adapter and not Path(args.adapter).exists():
        raise UserError(f"--adapter {args.adapter}: no such file or folder")
    device = resolve_device(args.device)
    precision = args.precision or default_precision(device)

    # The model, prompt and length the adapter was trained with, unless overridden (then warned about).
    run = adapter_run_args(args.adapter) if args.adapter else {}
    if args.model:
        model_dir = Path(args.model)
        if run.get("model_dir") and Path(run["model_dir"]).resolve() != model_dir.resolve():
            print(f"warning: the adapter was trained on {run['model_dir']}, scoring with {model_dir}", file=sys.stderr)
    elif run.get("model_dir") and args.cache_dir is None:
        model_dir = Path(run["model_dir"])  # the base the adapter was trained on
    else:
        model_dir = default_model_dir(args.cache_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: not a model folder (no config.json)")
    prompt_file = args.prompt_file or run.get("prompt_file")
    max_len = args.max_seq_len or run.get("max_seq_len") or 512
    for key, mine in (("prompt_file", prompt_file), ("max_seq_len", max_len)):
        if run and run.get(key) != mine:
            print(f"warning: the adapter was trained with {key}={run.get(key)!r}, scoring with {mine!r}",
                  file=sys.stderr)

    tok = Tokenizer.from_dir(model_dir)
    template = load_prompt(prompt_file) if prompt_file else DEFAULT_PROMPT
    df, stats = read_table(args.data, skip_bad_rows=args.skip_bad_rows)
    ds = RowDataset(df, Encoder(tok, template, max_len, loss="answer"), pad_id=tok.pad_id)

    merge = precision == "fp32"  # the adapter folded into the weights: the plain base's speed
    model = build_model(model_dir, precision, device, args.adapter, merge=merge)
    print(f"scoring {len(df)} rows of {args.data} with {model_dir.name} ({precision})"
          + ((f" + {args.adapter}" + (" (merged into the weights)" if merge else "")) if args.adapter
             else " (no adapter: zero-shot)"), file=sys.stderr)
    p_true = score(model, ds, args.batch_size, device, tok.label_ids())
    print(f"rows truncated to {max_len} tokens: {ds.stats['truncated']}", file=sys.stderr)

    # One line per input row, in input order; rows skipped as bad get the fallback.
    n_total = stats["rows_total"]
    ids = stats["ids"] if stats.get("ids") is not None else list(range(n_total))
    pred = np.full(n_total, FALLBACK)
    probs = np.full(n_total, float(FALLBACK))
    kept = df["_row"].to_numpy()  # positions of the kept rows among all rows
    pred[kept], probs[kept] = p_true > 0.5, p_true
    if out.exists():
        print(f"overwriting {out}", file=sys.stderr)
    sub = pd.DataFrame({"ID": ids, "is_correct": np.where(pred, "True", "False")})
    if args.probs:
        sub["p_true"] = probs
    atomic_write(out, lambda tmp: sub.to_csv(tmp, index=False))  # never a half-written submission
    skipped = n_total - len(df)
    print(f"wrote {out} ({n_total} rows" + (f", {skipped} skipped rows given {FALLBACK}" if skipped else "") + ")",
          file=sys.stderr)

    broken = stats["skipped_by_reason"].get("broken record", 0)
    if broken:
        print(f"warning: {broken} malformed record(s) of {args.data} have no readable ID and no line in the "
              f"submission", file=sys.stderr)
    labelled = df["label"].to_numpy() >= 0
    if labelled.any():
        m = metrics(df["is_correct"].to_numpy()[labelled], p_true[labelled])
        print(format_metrics(m))
        if args.metrics:
            Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics).write_text(json.dumps(m, indent=2) + "\n")
    elif args.metrics:
        print(f"warning: {args.data} has no is_correct labels; no metrics written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
