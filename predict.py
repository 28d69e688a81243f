"""Score rows with base + LoRA adapter and write the contest's submission file.

    python predict.py --adapter runs/default/adapter_model.safetensors --data test.csv

One forward pass per batch, no generation: at the cue ("Answer is correct (True/False only):")
the model's logits for " True" and " False" are compared; p_true is their two-way softmax.
The vocabulary head runs at that one position only. Rows are sorted by length into batches
(less padding) and written back in the input's order. train.py evaluates with `score()` and
`metrics()` from this file, so validation numbers and predictions come from the same code.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.dataset import DEFAULT_PROMPT, Encoder, RowDataset, collate, load_prompt, read_table

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data" / "gsm8k_val.csv"
FALLBACK = False  # the prediction written for a row skipped with --skip-bad-rows (most rows are wrong)


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- scoring

@torch.no_grad()
def score(model, ds: RowDataset, batch_size: int, device, label_ids: tuple[int, int],
          progress: bool = True, chunk_rows: int = 1024) -> np.ndarray:
    """p_true for every row of `ds`, in row order.

    Rows go in order of character length, `chunk_rows` at a time; each chunk is tokenized, then
    re-sorted by token count and cut into batches, so a batch's rows have (nearly) the same
    number of tokens: about 2% of the batch is padding, against 15% when sorting by characters
    alone (gsm8k_val, batch 16), and 30% unsorted.
    """
    was_training = model.training
    model.eval()
    by_chars = np.argsort(ds.lengths, kind="stable")
    chunk_rows = max(batch_size, chunk_rows // batch_size * batch_size)  # whole batches per chunk
    p_true = np.zeros(len(ds), dtype=np.float64)
    t_id, f_id = label_ids
    bar = tqdm(total=len(ds), desc="score", unit="row", disable=not progress, leave=False, file=sys.stderr)
    for c in range(0, len(by_chars), chunk_rows):
        part = by_chars[c:c + chunk_rows]
        examples = ds.get_batch(part)  # tokenizes the chunk
        by_tokens = np.argsort([len(ex["input_ids"]) for ex in examples], kind="stable")
        for s in range(0, len(by_tokens), batch_size):
            sel = by_tokens[s:s + batch_size]
            b = collate([examples[j] for j in sel], ds.pad_id)
            logits = model(b["input_ids"].to(device), b["attention_mask"].to(device),
                           logits_at=b["cue_pos"].to(device))  # (B, V)
            two = logits[:, [f_id, t_id]].float()  # (B, 2)
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


def metrics(labels: np.ndarray, p_true: np.ndarray) -> dict:
    """Accuracy, precision, recall, F1 (True is the positive class), confusion matrix, ROC-AUC."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(p_true) > 0.5
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(n=len(y), accuracy=(tp + tn) / max(len(y), 1), precision=precision, recall=recall, f1=f1,
                auc=roc_auc(y, p_true), confusion={"tp": tp, "fp": fp, "fn": fn, "tn": tn})


def format_metrics(m: dict) -> str:
    c = m["confusion"]
    return (f"n={m['n']} acc={m['accuracy']:.4f} auc={m['auc']:.4f} P={m['precision']:.3f} "
            f"R={m['recall']:.3f} F1={m['f1']:.3f} [tp={c['tp']} fp={c['fp']} fn={c['fn']} tn={c['tn']}]")


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
    p.add_argument("--precision", choices=["int8", "nf4", "bf16", "fp16", "fp32"],
                   help="base weights (default: int8 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    # outputs
    p.add_argument("--out", default="submission.csv", help="submission file: ID,is_correct")
    p.add_argument("--probs", action="store_true", help="add a p_true column to the submission")
    p.add_argument("--metrics", help="write metrics JSON here (when the data has is_correct)")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton launches on the current device
    return device


def default_precision(device: torch.device) -> str:
    # On CUDA the 8-bit base is the point (memory); on CPU fp32 is both exact and the fastest
    # matmul most CPUs have (no bf16 units), and the default model is small.
    return "int8" if device.type == "cuda" else "fp32"


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32" or device.type == "cpu" and precision in ("int8", "nf4"):
        return torch.float32
    return torch.float16 if precision == "fp16" else torch.bfloat16


def adapter_run_args(adapter: str) -> dict:
    """The args.json train.py saved beside (or one folder above) the adapter, if any."""
    p = Path(adapter)
    folder = p if p.is_dir() else p.parent
    for cand in (folder / "args.json", folder.parent / "args.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    return {}


def build_model(model_dir, precision, device, adapter=None, merge: bool = False):
    """The base at `precision` on `device`, plus the adapter if given, in eval mode.

    merge: fold the adapter into the weights (W + s·B@A) so scoring runs the plain base (fp32
    bases only: there the sum is exact to float rounding; a bf16 weight would round most of a
    small update away, and an int8 or nf4 weight cannot take it without re-quantizing).
    """
    from lora.inject import lora_modules
    from lora.io import AdapterError, load_adapter
    from model.load import LoadError, load_model
    try:
        model = load_model(model_dir, precision=precision, device=device, dtype=compute_dtype(precision, device))
        if adapter:
            load_adapter(model, adapter)
    except (LoadError, AdapterError) as e:
        raise UserError(str(e)) from None
    if merge and adapter:
        if precision != "fp32":
            raise ValueError(f"build_model: merge needs an fp32 base, not {precision}")
        for m in lora_modules(model).values():
            m.merge()
    return model.to(device).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    from model.default import default_model_dir
    from model.tokenizer import Tokenizer

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
    import pandas as pd
    sub = pd.DataFrame({"ID": ids, "is_correct": np.where(pred, "True", "False")})
    if args.probs:
        sub["p_true"] = probs
    tmp = out.with_name(out.name + ".tmp")
    sub.to_csv(tmp, index=False)
    os.replace(tmp, out)  # never a half-written submission
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


def run_cli(main) -> None:
    """User mistakes (bad flags, files, rows, adapters) end as one line and exit code 2.

    Every error class of model/, lora/ and data/ is a ValueError (or FileNotFoundError /
    DefaultModelError) with a message naming the file, row, key or flag. LLAMA3_LORA_DEBUG=1
    shows the traceback instead.
    """
    from model.default import DefaultModelError
    try:
        sys.exit(main())
    except (UserError, ValueError, FileNotFoundError, DefaultModelError) as e:
        if os.environ.get("LLAMA3_LORA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_cli(main)
