"""What a training run is made of, apart from its loop (train.py): the run's config, the
learning-rate schedule, data, adapter, optimizer, evaluation, the metrics log and plot, and the
data-parallel helpers.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data.batches import RowDataset
from data.prompt import DEFAULT_PROMPT, Encoder, load_prompt
from data.read import read_table, split_by_question
from engine.build import build_model, resolve_device
from engine.checkpoint import fingerprint
from engine.cli import UserError
from engine.score import MIN_TUNE_ROWS, best_threshold, format_metrics, metrics, score
from lora.inject import ALL_PROJECTIONS, apply_lora, mark_only_lora_trainable, param_summary
from model.precision import PRECISIONS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN, DEFAULT_VAL = REPO / "data" / "gsm8k_train.csv", REPO / "data" / "gsm8k_val.csv"
# Rank 0 evaluates alone while the others wait in a barrier: allow for a long validation pass.
DIST_TIMEOUT = datetime.timedelta(hours=2)


def flag(key: str) -> str:
    """The command-line flag of a TrainConfig field: val_rows -> --val-rows."""
    return "--" + key.replace("_", "-")


@dataclass
class TrainConfig:
    """One training run's settings: train.py's flags, by the same names (see `--help`)."""
    # model and data
    model: str | None = None  # HF folder; None: the embedded default
    cache_dir: str | None = None  # where the default model is converted and kept
    data: str | None = None  # training rows; None: data/gsm8k_train.csv
    val_file: str | None = None  # None: data/gsm8k_val.csv with the default data, else a split of data
    val_fraction: float = 0.05  # share of questions held out when there is no val_file
    val_rows: int | None = None  # evaluate on at most this many validation rows (a seeded sample)
    out: str = "runs/default"
    prompt_file: str | None = None  # None: data/prompt.py's DEFAULT_PROMPT
    max_seq_len: int = 512
    skip_bad_rows: bool = False
    # LoRA
    r: int = 32
    alpha: float = 64
    dropout: float = 0.1
    rslora: bool = False
    targets: str = ",".join(ALL_PROJECTIONS)
    # precision and device
    precision: str | None = None  # None: model/precision.py's default_precision(device)
    device: str = "auto"
    # optimisation
    lr: float = 4e-4
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup: float = 0.03  # steps (>= 1) or a fraction of steps (< 1)
    batch_size: int = 4  # rows per micro-batch, per rank
    grad_accum: int = 6
    steps: int = 400
    loss: str = "answer"  # answer | full
    optim: str = "adamw"  # adamw | adamw8bit
    weight_decay: float = 0.0
    clip: float = 1.0  # 0: off
    grad_checkpointing: str = "auto"  # auto | on | off: recompute each block's activations in backward
    seed: int = 42
    # evaluation and checkpoints
    eval_every: int = 50
    eval_batch_size: int = 16
    save_every: int = 50
    resume: str | None = None  # "": OUT/checkpoint; a folder: that checkpoint
    overwrite: bool = False

    def __post_init__(self):
        for name in ("r", "batch_size", "grad_accum", "steps", "max_seq_len", "save_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise UserError("--dropout must be in [0, 1)")
        for name in ("alpha", "lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"{flag(name)} must be greater than 0, got {getattr(self, name)}")
        for name in ("weight_decay", "clip", "warmup", "eval_every"):
            if getattr(self, name) < 0:
                raise UserError(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        if self.val_rows is not None and self.val_rows < 1:
            raise UserError(f"--val-rows must be at least 1, got {self.val_rows}")
        if not 0 < self.val_fraction < 1:
            raise UserError("--val-fraction must be in (0, 1)")
        if isinstance(self.grad_checkpointing, bool):  # an older run's args.json: True / False
            self.grad_checkpointing = "on" if self.grad_checkpointing else "off"
        if self.grad_checkpointing not in ("auto", "on", "off"):
            raise UserError(f"--grad-checkpointing {self.grad_checkpointing}: use auto, on or off")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision}: use one of {', '.join(PRECISIONS)}")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(self.warmup * self.steps)

    def to_dict(self) -> dict:
        return asdict(self)


def argument_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's flags, one per TrainConfig field and by its name, with its default and a help
    each: `TrainConfig(**vars(argument_parser().parse_args(argv)))` is the run's config."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=description)
    # model and data
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", help="where the default model is converted and kept")
    p.add_argument("--data", help="training rows: CSV / Parquet / JSONL (default: data/gsm8k_train.csv)")
    p.add_argument("--val-file", help="validation rows (default: data/gsm8k_val.csv with the default data, "
                                      "else a split of --data by question)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of questions held out when there is no --val-file")
    p.add_argument("--val-rows", type=int, help="evaluate on at most this many validation rows (a seeded sample)")
    p.add_argument("--out", default=d.out, help="output folder: adapters, checkpoint, metrics, plots")
    p.add_argument("--prompt-file", help="prompt template with {question} {answer} {solution} (default: built-in)")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len, help="token limit per row; the solution's middle is cut")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    # LoRA
    p.add_argument("--r", type=int, default=d.r, help="adapter rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="adapter scale numerator: s = alpha / r (> 0)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the adapter input")
    p.add_argument("--rslora", action="store_true", help="rank-stabilised scale s = alpha / sqrt(r)")
    p.add_argument("--targets", default=d.targets, help="comma-separated projections to adapt")
    # precision and device
    p.add_argument("--precision", choices=PRECISIONS,
                   help="base weights (default: int8 on CUDA; fp32 on CPU, where it is exact and fastest)")
    p.add_argument("--device", default=d.device, help="cuda, cpu or auto")
    # optimisation
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (> 0)")
    p.add_argument("--scheduler", choices=["cosine", "linear", "constant"], default=d.scheduler, help="decay after warmup")
    p.add_argument("--warmup", type=float, default=d.warmup, help="warmup steps (>= 1) or fraction of --steps (< 1)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per micro-batch (per rank)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--loss", choices=["answer", "full"], default=d.loss,
                   help="answer: the label token only; full: every prompt token and the label")
    p.add_argument("--optim", choices=["adamw", "adamw8bit"], default=d.optim, help="optimizer")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on A and B")
    p.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip (0: off)")
    p.add_argument("--grad-checkpointing", nargs="?", const="on", choices=["auto", "on", "off"],
                   default=d.grad_checkpointing,
                   help="recompute each block's activations in backward: less memory, ~30%% more compute "
                        "(auto: on unless the step fits comfortably in free memory without it)")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_const", const="off",
                   help="the same as --grad-checkpointing off")
    p.add_argument("--seed", type=int, default=d.seed, help="data order, split, adapter init and dropout")
    # evaluation and checkpoints
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="evaluate every N steps (and at 0 and the end; 0: only those)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="rows per forward pass when evaluating")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from OUT/checkpoint (or the given checkpoint folder)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds another run")
    return p


def config_from_argv(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig train.py builds from these flags."""
    return TrainConfig(**vars(argument_parser().parse_args(argv)))


# Settings that must match for --resume to continue the same run exactly.
RESUME_KEYS = ("model", "data", "val_file", "val_fraction", "r", "alpha", "dropout", "rslora", "targets",
               "precision", "batch_size", "grad_accum", "max_seq_len", "loss", "optim", "seed", "prompt_file",
               "lr", "scheduler", "warmup", "steps", "clip", "weight_decay", "val_rows")
assert set(RESUME_KEYS) <= {f.name for f in fields(TrainConfig)}


def data_files(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """(training file, validation file or None for a split of the training file)."""
    data = Path(cfg.data) if cfg.data else DEFAULT_TRAIN
    return data, Path(cfg.val_file) if cfg.val_file else (DEFAULT_VAL if cfg.data is None else None)


def run_record(cfg: TrainConfig, model_dir: Path) -> dict:
    """What scoring with this run's adapter needs to know, stored in every adapter file it writes
    (lora/io.py: the header's "run"), so the file alone is enough: predict.py reads it back. Also
    the data files' fingerprints, which --resume checks."""
    data, val = data_files(cfg)
    fp = lambda f: {"path": str(Path(f).resolve()), **fingerprint(f)} if Path(f).is_file() else None
    return {"model_dir": str(Path(model_dir).resolve()),
            "prompt": load_prompt(cfg.prompt_file) if cfg.prompt_file else DEFAULT_PROMPT,
            "prompt_file": cfg.prompt_file and str(Path(cfg.prompt_file).resolve()),
            "max_seq_len": cfg.max_seq_len, "precision": cfg.precision, "loss": cfg.loss,
            "data": {"train": fp(data), "val": fp(val) if val else None}}


def get_lr(step: int, *, lr: float, steps: int, warmup: int, scheduler: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if scheduler == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    if scheduler == "linear":
        return lr * max(0.0, 1 - progress)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- set-up

def setup_distributed(device_arg: str):
    """(rank, world size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_arg)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_arg in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=DIST_TIMEOUT)
    else:
        device = resolve_device("cpu" if device_arg == "auto" else device_arg)
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    return rank, world, device


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
    if len(val_df) == 0 or len(df) == 0:
        side = "validation" if len(val_df) == 0 else "training"
        raise UserError(f"{data}: no {side} rows left after splitting {len(df) + len(val_df)} row(s) by question "
                        f"(--val-fraction {cfg.val_fraction}); pass --val-file or use more rows")
    train_ds = RowDataset(df.reset_index(drop=True), Encoder(tok, template, cfg.max_seq_len, cfg.loss), pad_id=tok.pad_id)
    val_ds = RowDataset(val_df.reset_index(drop=True), Encoder(tok, template, cfg.max_seq_len, "answer"), pad_id=tok.pad_id)
    return train_ds, val_ds, stats


def build_for_training(cfg: TrainConfig, model_dir: Path, device: torch.device):
    """The base at cfg.precision with fresh adapters (seeded by cfg.seed); only A and B train."""
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    bad = [t for t in targets if t.split(".")[-1] not in ALL_PROJECTIONS]
    if bad:
        raise UserError(f"--targets: {', '.join(bad)} not supported (choose from {','.join(ALL_PROJECTIONS)})")
    model = build_model(model_dir, cfg.precision, device)
    torch.manual_seed(cfg.seed)  # adapter init
    try:
        apply_lora(model, targets=tuple(targets), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora)
    except ValueError as e:
        raise UserError(f"--targets {cfg.targets}: {e}") from None
    mark_only_lora_trainable(model)
    model.to(device)
    return model, param_summary(model)


def make_optimizer(cfg: TrainConfig, params):
    if cfg.optim == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def estimate_peak_gib(model, cfg: TrainConfig, checkpointing: bool) -> float:
    """A deliberately generous estimate of a training step's peak device memory, in GiB: weights
    + adapter training state + activations kept for backward + the head's logits.

    Activations per token and layer: the inputs of every GEMM and elementwise op of a block
    (about 14 x hidden + 5 x intermediate values in the compute dtype) plus the LoRA adapters'
    fp32 copies of their inputs (about 6 x hidden + intermediate). With checkpointing only each
    block's input is kept, plus one block's worth during its recompute.
    """
    mc, act = model.cfg, (model.compute_dtype or model.output_weight.dtype).itemsize
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adam = lora * (4 + 4 + (2 if cfg.optim == "adamw8bit" else 8))  # grad + two moments
    tokens = cfg.batch_size * cfg.max_seq_len
    h, i, layers = mc.hidden_size, mc.intermediate_size, mc.num_hidden_layers
    per_layer = tokens * ((14 * h + 5 * i) * act + (6 * h + i) * 4)
    acts = layers * tokens * h * act + per_layer if checkpointing else layers * per_layer
    head = (cfg.batch_size if cfg.loss == "answer" else 1024) * mc.vocab_size * 4 * 2
    return (weights + adam + acts + head) / 2**30


def free_memory_bytes(device: torch.device) -> int:
    """Memory a run could still take: free CUDA memory, or the kernel's MemAvailable on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


CHECKPOINT_MARGIN = 0.5  # auto: off only when the extra memory without it is at most half of what is free


def decide_checkpointing(model, cfg: TrainConfig, device: torch.device) -> tuple[bool, str]:
    """(checkpointing on?, why) for --grad-checkpointing auto|on|off. auto: off when the generous
    estimate of what a step needs beyond the loaded weights, without checkpointing, is at most
    CHECKPOINT_MARGIN of the free memory; on otherwise (an out-of-memory at step 1 costs more
    than a slower step)."""
    if cfg.grad_checkpointing != "auto":
        return cfg.grad_checkpointing == "on", f"--grad-checkpointing {cfg.grad_checkpointing}"
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    need = estimate_peak_gib(model, cfg, checkpointing=False) - weights / 2**30
    free = free_memory_bytes(device) / 2**30
    on = need > CHECKPOINT_MARGIN * free
    return on, f"auto: a step needs ~{need:.1f} GiB without it, {free:.1f} GiB free"


def truncated_share(ds: RowDataset, n: int = 200) -> float:
    """Share of rows cut to fit max_seq_len, from a fixed sample (tokenizing all would be slow)."""
    sample = np.random.default_rng(0).choice(len(ds), size=min(n, len(ds)), replace=False)
    return float(np.mean([ds[int(i)]["truncated"] for i in sample])) if len(ds) else 0.0


# ----------------------------------------------------------------------------- during the run

def evaluate(model, val_ds: RowDataset, cfg: TrainConfig, device, label_ids, step: int, log) -> tuple[dict, dict]:
    """Validation metrics at `step` (at the 0.5 cut) and the tuned decision threshold, logged and
    printed. The threshold is {"threshold": t or None below MIN_TUNE_ROWS rows, "rows": n,
    "accuracy_at_threshold", "best_cut"}."""
    p = score(model, val_ds, cfg.eval_batch_size, device, label_ids)
    y = val_ds.df["is_correct"].to_numpy()
    m = metrics(y, p)
    cut, acc = best_threshold(y, p)
    th = {"threshold": cut if len(y) >= MIN_TUNE_ROWS else None, "rows": len(y), "best_cut": cut,
          "accuracy_at_threshold": acc}
    log({"step": step, "eval": m, "threshold": th})
    note = "" if th["threshold"] is not None else f", not used: fewer than {MIN_TUNE_ROWS} rows"
    tqdm.write(f"step {step:>5} validation: {format_metrics(m)}\n"
               f"           tuned threshold {cut:.4f}: acc={acc:.4f} on these {len(y)} rows{note}", file=sys.stderr)
    return m, th


class StopSignal:
    """SIGTERM / SIGINT during a run: the first asks the loop to stop after the step in flight
    (with a checkpoint); a second one stops at once (KeyboardInterrupt), except inside
    `deferred()` (a checkpoint being written), which it must not tear."""

    def __init__(self):
        self.signal: int | None = None
        self._saving = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame):
        if self.signal and not self._saving:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    @contextlib.contextmanager
    def deferred(self):
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def agree(self, device) -> None:
        """Data-parallel: every rank takes the signal any rank got, so all stop after one step."""
        flag_t = torch.tensor([float(self.signal or 0)], device=device)
        dist.all_reduce(flag_t, op=dist.ReduceOp.MAX)
        self.signal = int(flag_t.item()) or None


def all_reduce_grads(params: list, loss_sum: float, device) -> float:
    """Sum the adapter gradients (and the loss) over ranks in one flat all-reduce.

    Explicit rather than DistributedDataParallel: only A and B have gradients, the sync must
    happen once per accumulation window, and the loss is already normalised by the global
    target count, so a plain sum is the exact gradient of the global batch.
    """
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [torch.tensor([loss_sum], device=device)])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        p.grad.copy_(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    return flat[-1].item()


def parse_json_line(line: str) -> dict | None:
    try:  # a line torn by a kill mid-write is dropped, not fatal
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class MetricsLog:
    """metrics.jsonl: one JSON record per line (steps and evaluations), flushed as written. On
    resume the records up to the checkpoint's step are kept and the rest dropped."""

    def __init__(self, path: Path, resume_step: int, write: bool):
        self.records = []
        if resume_step and path.is_file():
            self.records = [r for r in map(parse_json_line, path.read_text().splitlines())
                            if r and r["step"] <= resume_step]
        self.file = open(path, "w") if write else None
        for r in self.records if self.file else ():
            self.file.write(json.dumps(r) + "\n")

    def __call__(self, rec: dict) -> None:
        self.records.append(rec)
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def plot(out: Path, records: list[dict]) -> None:
    """loss.png: training loss (left axis) and validation accuracy and ROC-AUC (right axis) over
    the steps, with the legend below the plot, clear of the curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    ev = [r for r in records if "eval" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if tr:
        ax.plot(*zip(*tr), label="train loss", color="tab:blue", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    if ev:
        steps = [r["step"] for r in ev]
        ax2.plot(steps, [r["eval"]["accuracy"] for r in ev], "o-", label="val accuracy", color="tab:orange")
        auc = [(s, r["eval"]["auc"]) for s, r in zip(steps, ev) if r["eval"]["auc"] is not None]
        if auc:
            ax2.plot(*zip(*auc), "s--", label="val ROC-AUC", color="tab:green")
    ax2.set_ylabel("validation accuracy, ROC-AUC")
    ax2.set_ylim(0, 1)
    fig.legend(loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # room for the legend under the axes
    fig.savefig(out / "loss.png.tmp.png", dpi=100)
    plt.close(fig)
    os.replace(out / "loss.png.tmp.png", out / "loss.png")
