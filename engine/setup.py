"""A training run's set-up, before its loop: which files it reads, its record (what every adapter
it writes carries), its rows, and the base model with fresh adapters."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from data.batches import RowDataset
from data.prompt import DEFAULT_PROMPT, Encoder, load_prompt
from data.read import read_table, split_by_question
from engine.build import build_model
from engine.checkpoint import fingerprint
from engine.config import TrainConfig
from lora.inject import ALL_PROJECTIONS, apply_lora, param_summary
from lora.io import CONFIG_NAME, WEIGHTS_NAME

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN, DEFAULT_VAL = REPO / "data" / "gsm8k_train.csv", REPO / "data" / "gsm8k_val.csv"


def data_files(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """(training file, validation file or None for a split of the training file)."""
    data = Path(cfg.data) if cfg.data else DEFAULT_TRAIN
    return data, Path(cfg.val_file) if cfg.val_file else (DEFAULT_VAL if cfg.data is None else None)


# What a run writes into its --out (train.py, engine/log.py, engine/checkpoint.py and what a crash in
# its atomic_write_dir leaves), the results first: --overwrite removes these and nothing else.
RUN_OUTPUTS = (WEIGHTS_NAME, CONFIG_NAME, "summary.json", "best", "loss.png", "checkpoint", "checkpoint.tmp",
               "checkpoint.old", "metrics.jsonl", "args.json")


def clear_run(out: Path) -> list[str]:
    """Delete the previous run's outputs (RUN_OUTPUTS) from `out`, so that none of them can be taken
    for the new run's; any other file stays. Returns the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def training_record(cfg: TrainConfig, model_dir: Path) -> dict:
    """What scoring with this run's adapter needs to know, stored in every adapter file it writes
    (lora/io.py: the header's "run" key), so the file alone is enough: predict.py reads it back.
    Also the data files' fingerprints, which --resume checks. Each evaluation adds the tuned
    threshold (train.py)."""
    data, val = data_files(cfg)
    fp = lambda f: {"path": str(Path(f).resolve()), **fingerprint(f)} if Path(f).is_file() else None
    return {"model_dir": str(Path(model_dir).resolve()),
            "prompt": load_prompt(cfg.prompt_file) if cfg.prompt_file else DEFAULT_PROMPT,
            "prompt_file": cfg.prompt_file and str(Path(cfg.prompt_file).resolve()),
            "max_seq_len": cfg.max_seq_len, "precision": cfg.precision, "activations": cfg.activations,
            "loss": cfg.loss,
            "data": {"train": fp(data), "val": fp(val) if val else None}}


def load_data(cfg: TrainConfig, tok) -> tuple[RowDataset, RowDataset, dict]:
    """(train rows, validation rows, the training file's read stats)."""
    data, val_file = data_files(cfg)
    template = load_prompt(cfg.prompt_file) if cfg.prompt_file else DEFAULT_PROMPT
    df, stats = read_table(data, skip_bad_rows=cfg.skip_bad_rows, require_label=True)
    if val_file:
        val_df, _ = read_table(val_file, skip_bad_rows=cfg.skip_bad_rows, require_label=True)
    else:
        df, val_df = split_by_question(df, cfg.val_fraction, cfg.seed)
    if cfg.val_rows and len(val_df) > cfg.val_rows:
        val_df = val_df.sample(n=cfg.val_rows, random_state=cfg.seed).sort_index()
    if val_file:
        stats["overlap"] = overlap_warning(df, val_df, data, val_file)
    if len(val_df) == 0 or len(df) == 0:
        side = "validation" if len(val_df) == 0 else "training"
        raise UserError(f"{data}: no {side} rows left after splitting {len(df) + len(val_df)} row(s) by question "
                        f"(--val-fraction {cfg.val_fraction}); pass --val-file or use more rows")
    train_ds = RowDataset(df.reset_index(drop=True), Encoder(tok, template, cfg.max_seq_len, cfg.loss), pad_id=tok.pad_id)
    val_ds = RowDataset(val_df.reset_index(drop=True), Encoder(tok, template, cfg.max_seq_len, "answer"), pad_id=tok.pad_id)
    return train_ds, val_ds, stats


def overlap_warning(train_df, val_df, data: Path, val_file: Path) -> str | None:
    """A warning when validation rows (or their questions) also occur in the training rows: their
    metrics and the threshold tuned on them would be training metrics. (A split of --data is by
    question, so only a --val-file can overlap.)"""
    questions = val_df["question"].drop_duplicates()
    same_question = train_df[train_df["question"].isin(questions)]  # (few rows: the merge stays cheap)
    if not len(same_question):
        return None
    shared = int(questions.isin(same_question["question"]).sum())
    key = ["question", "answer", "solution"]
    rows = int(val_df[key].merge(same_question[key].drop_duplicates(), on=key).shape[0])
    return (f"warning: {rows} of {len(val_df)} validation rows of {val_file} also occur in the training data "
            f"{data}, and {shared} of {len(questions)} of their questions: the validation metrics and the tuned "
            f"threshold are partly training metrics")


def truncated_share(ds: RowDataset, n: int = 200) -> float:
    """Share of rows cut to fit max_seq_len, from a fixed sample (tokenizing all would be slow)."""
    sample = np.random.default_rng(0).choice(len(ds), size=min(n, len(ds)), replace=False)
    return float(np.mean([ds[int(i)]["truncated"] for i in sample])) if len(ds) else 0.0


def build_for_training(cfg: TrainConfig, model_dir: Path, device: torch.device):
    """(model, "trainable X / total Y" line): the base at cfg.precision with fresh adapters
    (seeded by cfg.seed); only A and B train."""
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    bad = [t for t in targets if t.split(".")[-1] not in ALL_PROJECTIONS]
    if bad:
        raise UserError(f"--targets: {', '.join(bad)} not supported (choose from {','.join(ALL_PROJECTIONS)})")
    model = build_model(model_dir, cfg.precision, device, cfg.activations)
    torch.manual_seed(cfg.seed)  # adapter init
    try:  # (apply_lora leaves only A and B trainable)
        apply_lora(model, targets=tuple(targets), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora)
    except ValueError as e:
        raise UserError(f"--targets {cfg.targets}: {e}") from None
    model.to(device)
    return model, param_summary(model)
