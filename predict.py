"""Score rows with base + LoRA adapter(s) and write the contest's submission file.

    python predict.py --adapter ckpt.safetensors --data test.csv          # the file alone is enough
    python predict.py --adapter runs/a runs/b runs/c --data test.csv      # an ensemble, base loaded once

One forward pass per batch, no generation: at the cue ("Answer is correct (True/False only):")
the model's logits for " True" and " False" are compared; p_true is their two-way softmax
(engine/score.py, which training's evaluation uses too). A row is predicted True when p_true
exceeds the threshold (the adapter's tuned one, else 0.5). One submission line per input row,
in the input's order.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.batches import RowDataset
from data.prompt import DEFAULT_PROMPT, Encoder, load_prompt
from data.read import read_table
from common.errors import UserError, cli_entry
from common.files import atomic_write, atomic_write_text
from engine.build import adapter_record, build_model, check_model_dir, check_precision, load_tokenizer, resolve_device
from engine.score import format_metrics, metrics, score_adapters
from model.default import default_model_dir
from model.precision import ACTIVATIONS, PRECISIONS, choose_activations, default_precision, native_bf16_feature

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data" / "gsm8k_val.csv"
FALLBACK = False  # the prediction written for a row skipped with --skip-bad-rows (most rows are wrong)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to score
    p.add_argument("--model", help="HF model folder (default: the adapter's base, else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", help="where the default model is converted and kept")
    p.add_argument("--adapter", nargs="+", help="adapter file(s) (adapter_model.safetensors, or any name) or folder(s); "
                                                "several: an ensemble, their p_true averaged (omit: the base model)")
    p.add_argument("--data", help="CSV / Parquet / JSONL with question, answer, solution (default: the embedded "
                                  "validation set, data/gsm8k_val.csv)")
    p.add_argument("--skip-bad-rows", action="store_true", help=f"skip bad rows (predicted {FALLBACK}) instead of stopping")
    # prompt and decision
    p.add_argument("--prompt-file", help="prompt template with {question} {answer} {solution} (default: the adapter's, else built-in)")
    p.add_argument("--max-seq-len", type=int, help="token limit per row (default: the adapter's, else 512)")
    p.add_argument("--threshold", default="auto",
                   help="predict True when p_true > this (auto: the adapter's tuned threshold, else 0.5)")
    # compute
    p.add_argument("--precision", choices=PRECISIONS, help="storage of the block projections (default: the "
                                                          "adapter's, else int8)")
    p.add_argument("--activations", choices=ACTIVATIONS, help="dtype an int8 / nf4 base computes in (default: "
                                                             "the adapter's, else auto: bf16 on a GPU and on a "
                                                             "CPU with native bf16, else fp32)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--share-prefixes", choices=("on", "off"), default="on",
                   help="compute once what rows start with in common (the instruction, a question with several "
                        "solutions); off: each row whole, the same p_true to float rounding")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    # outputs
    p.add_argument("--out", default="submission.csv", help="submission file: ID,is_correct")
    p.add_argument("--probs", action="store_true", help="add a p_true column to the submission")
    p.add_argument("--metrics", help="write metrics JSON here (when the data has is_correct)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- phases

def check_paths(args) -> Path:
    """Before anything is loaded: the inputs exist, and the outputs can be written and overwrite
    no input and not each other."""
    for flag, value in (("--batch-size", args.batch_size), ("--max-seq-len", args.max_seq_len)):
        if value is not None and value < 1:  # (a --max-seq-len of 0 is not "the adapter's")
            raise UserError(f"{flag} must be at least 1, got {value}")
    for a in args.adapter or ():
        if not Path(a).exists():
            raise UserError(f"--adapter {a}: no such file or folder")
    inputs = [Path(args.data), *(Path(a) for a in args.adapter or ()), *([Path(args.model)] if args.model else [])]
    out = Path(args.out)
    if args.metrics and Path(args.metrics).resolve() == out.resolve():  # the metrics would replace the submission
        raise UserError(f"--metrics {args.metrics} is the --out file; give the metrics another name")
    for flag, path in (("--out", out), ("--metrics", Path(args.metrics) if args.metrics else None)):
        if path is None:
            continue
        if path.is_dir():
            raise UserError(f"{flag} {path}: is a folder; give a file name such as {path / 'submission.csv'}")
        for inp in inputs:
            if path.resolve() == inp.resolve() or inp.is_dir() and path.resolve().is_relative_to(inp.resolve()):
                raise UserError(f"{flag} {path} would overwrite an input ({inp}); pick another file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after scoring
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None
        if not os.access(path.parent, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path}: not writable")
    return out


@dataclass
class Settings:
    """How to score: the adapter's training settings unless a flag overrides them."""
    model_dir: Path
    template: str
    max_len: int
    precision: str
    activations: str  # the activation dtype's name, and why it was chosen
    activations_why: str
    threshold: float
    threshold_from: str


def settings(args, device) -> Settings:
    """The model, prompt, length, precision and activation dtype the adapter(s) were trained with,
    unless overridden (then warned about), and the decision threshold."""
    runs = [adapter_record(a) for a in args.adapter or ()]
    run = runs[0] if runs else {}
    for other, a in zip(runs[1:], (args.adapter or [])[1:]):
        for key in ("model_dir", "prompt", "max_seq_len", "precision", "activations"):
            if other.get(key) != run.get(key):
                print(f"warning: --adapter {a} was trained with {key}={other.get(key)!r}, "
                      f"{args.adapter[0]} with {run.get(key)!r}; scoring all with the first's", file=sys.stderr)
    warn = lambda what, trained, used: print(f"warning: the adapter was trained with {what}={trained!r}, "
                                             f"scoring with {used!r}", file=sys.stderr)
    if args.model:
        model_dir = Path(args.model)
        if run.get("model_dir") and Path(run["model_dir"]).resolve() != model_dir.resolve():
            print(f"warning: the adapter was trained on {run['model_dir']}, scoring with {model_dir}", file=sys.stderr)
    elif run.get("model_dir") and args.cache_dir is None:
        model_dir = Path(run["model_dir"])  # the base the adapter was trained on
        if not (model_dir / "config.json").is_file():
            raise UserError(f"--adapter {args.adapter[0]} was trained on {model_dir}, which is not here: "
                            f"pass --model with that model's folder")
    else:
        model_dir = default_model_dir(args.cache_dir)
    check_model_dir(model_dir)

    # The template the adapter was trained with: its text (an older adapter names only its file).
    old_file = run.get("prompt_file")
    readable = old_file and (Path(old_file).is_file() or not args.prompt_file)  # (else load_prompt says why)
    trained = run.get("prompt") or (load_prompt(old_file) if readable else DEFAULT_PROMPT)
    template = load_prompt(args.prompt_file) if args.prompt_file else trained
    if run and template != trained:  # the template's text, not its file name, decides
        warn("prompt_file", old_file, args.prompt_file)
    max_len = args.max_seq_len or run.get("max_seq_len") or 512
    if run and run.get("max_seq_len") != max_len:
        warn("max_seq_len", run.get("max_seq_len"), max_len)
    precision = args.precision or run.get("precision") or default_precision(device)
    if args.precision and run.get("precision") and run["precision"] != args.precision:
        warn("precision", run["precision"], args.precision)
    check_precision(precision, device)
    activations, activations_why = scoring_activations(args, run, precision, device)

    if args.threshold == "auto":
        tuned = run.get("threshold")
        threshold, where = (tuned, f"tuned on {run.get('threshold_rows')} validation rows") if tuned is not None \
            else (0.5, "the default")
        if len(runs) > 1 and tuned is not None:
            threshold, where = 0.5, "the default (an ensemble has no tuned threshold)"
    else:
        try:
            threshold, where = float(args.threshold), "--threshold"
        except ValueError:
            raise UserError(f"--threshold {args.threshold}: expected auto or a number in [0, 1]") from None
        if not 0 <= threshold <= 1:
            raise UserError(f"--threshold {args.threshold}: expected auto or a number in [0, 1]")
    return Settings(model_dir, template, max_len, precision, activations, activations_why, threshold, where)


def scoring_activations(args, run: dict, precision: str, device) -> tuple[str, str]:
    """(activation dtype, why): --activations, else the adapter's (an int8 / nf4 base only: a float
    precision computes in its own dtype), else auto. An adapter trained with bf16 activations is
    scored in fp32 on a CPU without native bf16 (fp32 is the wider dtype; emulated bf16 would be
    many times slower), saying so."""
    trained = run.get("activations")
    if args.activations:
        if trained and trained != args.activations and precision in ("int8", "nf4"):
            print(f"warning: the adapter was trained with activations={trained!r}, scoring with "
                  f"{args.activations!r}", file=sys.stderr)
        return choose_activations(precision, device, args.activations)
    if precision not in ("int8", "nf4") or trained not in ("bf16", "fp32"):
        return choose_activations(precision, device, "auto")
    if trained == "bf16" and device.type == "cpu" and native_bf16_feature() is None:
        return "fp32", "trained with bf16; this CPU has no native bf16, so fp32"
    return trained, "as trained"


def write_outputs(args, out: Path, ids: list, pred: np.ndarray, p_true: np.ndarray) -> None:
    """The submission (and its p_true column), atomically; if the disk refuses it, the scores go
    to a temporary file named in the error, so the scoring is not lost."""
    sub = pd.DataFrame({"ID": ids, "is_correct": np.where(pred, "True", "False")})
    if args.probs:
        sub["p_true"] = p_true
    if out.exists():
        print(f"overwriting {out}", file=sys.stderr)
    try:
        atomic_write(out, lambda tmp: sub.to_csv(tmp, index=False))  # never a half-written submission
    except OSError as e:
        keep = Path(tempfile.gettempdir()) / f"{out.stem}.p_true.{os.getpid()}.csv"
        try:
            pd.DataFrame({"ID": ids, "p_true": p_true}).to_csv(keep, index=False)
            saved = f"the scores are saved in {keep}"
        except OSError:
            saved = "the scores could not be saved either"
        raise UserError(f"--out {out}: cannot write it ({e.strerror or e}); {saved}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data is None:  # say so: a "submission" of the embedded validation set is rarely what is wanted
        args.data = str(DEFAULT_DATA)
        print(f"no --data given: scoring {DEFAULT_DATA.relative_to(REPO)}, the embedded validation set "
              f"(--data FILE scores your own)", file=sys.stderr)
    out = check_paths(args)
    device = resolve_device(args.device)
    s = settings(args, device)

    tok = load_tokenizer(s.model_dir)
    df, stats = read_table(args.data, skip_bad_rows=args.skip_bad_rows)
    ds = RowDataset(df, Encoder(tok, s.template, s.max_len, loss="answer"), pad_id=tok.pad_id)
    n_total = stats["rows_total"]
    ids = stats["ids"] if stats.get("ids") is not None else list(range(n_total))
    if stats.get("ids") is None:  # (a labelled training file, say): the submission cannot name the rows
        print(f"note: {args.data} has no ID column: the submission's IDs are row numbers, 0 to {n_total - 1}",
              file=sys.stderr)
    dupes = pd.Series(ids)[pd.Series(ids).duplicated()].unique() if stats.get("ids") is not None else []
    if len(dupes):
        print(f"warning: {args.data} repeats {len(dupes)} ID(s) (first: {dupes[0]!r}); the submission keeps "
              f"one line per row, so it repeats them too", file=sys.stderr)

    adapters = args.adapter or []
    merge = s.precision == "fp32" and len(adapters) == 1  # folded into the weights: the plain base's speed
    model = build_model(s.model_dir, s.precision, device, s.activations)
    def announce(i):  # once the first adapter is in place (a wrong one fails before this line)
        if i in (None, 0):
            print(f"scoring {len(df)} rows of {args.data} with {s.model_dir.name} ({s.precision}, activations "
                  f"{s.activations}: {s.activations_why})"
                  + (f" + {' + '.join(adapters)}" + (" (merged into the weights)" if merge else "")
                     + (f", p_true averaged over {len(adapters)} adapters" if len(adapters) > 1 else "")
                     if adapters else " (no adapter: zero-shot)")
                  + f"; True when p_true > {s.threshold:g} ({s.threshold_from}); tokenizer {tok.path}, labels "
                  f"\" True\" = {tok.label_ids()[0]}, \" False\" = {tok.label_ids()[1]}", file=sys.stderr)
    counts = {}
    p_true = score_adapters(model, adapters, ds, args.batch_size, device, tok.label_ids(), merge=merge,
                            on_loaded=announce, share=args.share_prefixes == "on", counts=counts)
    bad = np.flatnonzero(~np.isfinite(p_true))
    if len(bad):
        first = ids[int(df["_row"].to_numpy()[bad[0]])]
        raise UserError(f"the model gave non-finite logits for {len(bad)} of {len(df)} rows (first: ID {first!r}); "
                        f"check the model's weights and --precision")
    print(f"rows truncated to {s.max_len} tokens: {ds.stats['truncated']}; the model computed "
          f"{counts.get('computed', 0):,} of the rows' {counts.get('row_tokens', 0):,} tokens"
          + (" (shared prefixes once)" if args.share_prefixes == "on" else ""), file=sys.stderr)

    # One line per input row, in input order; rows skipped as bad get the fallback.
    pred, probs = np.full(n_total, FALLBACK), np.full(n_total, float(FALLBACK))
    kept = df["_row"].to_numpy()  # positions of the kept rows among all rows
    pred[kept], probs[kept] = p_true > s.threshold, p_true
    write_outputs(args, out, ids, pred, probs)
    skipped = n_total - len(df)
    print(f"wrote {out} ({n_total} rows" + (f", {skipped} skipped rows given {FALLBACK}" if skipped else "") + ")",
          file=sys.stderr)

    broken = stats["skipped_by_reason"].get("broken record", 0) - stats.get("broken_ids", 0)
    if broken:
        print(f"warning: {broken} malformed record(s) of {args.data} have no readable ID and no line in the "
              f"submission", file=sys.stderr)
    labelled = df["label"].to_numpy() >= 0
    if labelled.any():
        m = metrics(df["is_correct"].to_numpy()[labelled], p_true[labelled], threshold=s.threshold)
        print(format_metrics(m))
        if args.metrics:
            atomic_write_text(args.metrics, json.dumps(m, indent=2) + "\n")
    elif args.metrics:
        print(f"warning: {args.data} has no is_correct labels; no metrics written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli_entry(main)
