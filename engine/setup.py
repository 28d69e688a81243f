"""A training run's set-up, before its loop: its folder (a new runs/run-NNN when --out is not
given), which files it reads, its record (what every adapter it writes carries), its rows, and
the base model with fresh adapters."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.errors import UserError
from common.files import atomic_write_text
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
RUNS = Path("runs")  # runs without --out go here, under the current folder (as a relative --out would)


# ----------------------------------------------------------------------------- the run's folder

def run_folder(cfg: TrainConfig, rank: int, world: int) -> tuple[Path, bool]:
    """(the run's folder, whether it is new). --out when given; else, with --resume, the run it
    continues (runs/latest, or the run holding the given checkpoint); else a new runs/run-NNN,
    so that a run started without flags never meets, let alone clobbers, an earlier one."""
    if cfg.out is not None:
        return Path(cfg.out), False
    if cfg.resume == "":
        return latest_run(), False
    if cfg.resume is not None:  # --resume runs/run-002 (a run folder) or runs/run-002/checkpoint
        given = Path(cfg.resume)
        return (given if (given / "checkpoint").is_dir() else given.parent), False
    name = new_run_folder(RUNS).name if rank == 0 else None
    if world > 1:  # rank 0 picks the number; every rank must use the same folder
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return RUNS / name, True


def new_run_folder(runs: Path) -> Path:
    """Create and return runs/run-NNN, one past the highest number there. mkdir, not a check:
    two runs started at once get two folders."""
    taken = [int(m.group(1)) for p in runs.glob("run-*") if (m := re.fullmatch(r"run-(\d+)", p.name))]
    n = max(taken, default=0)
    try:
        runs.mkdir(parents=True, exist_ok=True)
        while True:
            n += 1
            try:
                (runs / f"run-{n:03d}").mkdir()
                return runs / f"run-{n:03d}"
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(f"cannot create a run folder in {runs.resolve()} ({e.strerror}); pass --out DIR") from None


def latest_run(runs: Path = RUNS) -> Path:
    """The folder runs/latest names (a symlink, or a file holding the name where there are no
    symlinks): what --resume continues when --out is not given."""
    link = runs / "latest"
    name = os.readlink(link) if link.is_symlink() else link.read_text().strip() if link.is_file() else None
    if name is None:
        raise UserError(f"--resume without --out continues {link}, and there is none in {runs.resolve()}: "
                        f"pass --out with the folder of the run to continue")
    if not (runs / name).is_dir():
        raise UserError(f"--resume without --out continues {link}, which names {runs / name}, a folder that is "
                        f"not there: pass --out with the folder of the run to continue")
    return runs / name


def point_latest(folder: Path, runs: Path = RUNS) -> None:
    """Make runs/latest name `folder` (a relative symlink, replaced atomically; a file holding the
    name where the file system has no symlinks), so the newest run has a path that stays the same."""
    link, tmp = runs / "latest", runs / ".latest.tmp"
    if link.is_dir() and not link.is_symlink():  # a folder someone made by that name: leave it be
        return
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(folder.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write_text(link, folder.name + "\n")


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
