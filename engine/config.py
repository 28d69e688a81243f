"""A training run's settings: `TrainConfig`, and train.py's flags made from it.

Each setting is written once, as a field: its default, its `--help` text, whether `--resume`
requires it unchanged, and any argparse options the flag needs. `argument_parser()` turns the
fields into flags (`val_rows` -> `--val-rows`), grouped under the headers below in `--help`;
`RESUME_KEYS` are the fields marked `resume=True`. train.py and bench/ parse the same flags with
`parse_train_args`.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from common.errors import UserError
from lora.inject import ALL_PROJECTIONS
from model.precision import ACTIVATIONS, PRECISIONS


MAX_SEED = 2**32 - 1  # numpy's RandomState (pandas' sample) takes no more; torch takes up to 2**64 - 1


def setting(default, help: str, *, resume: bool = False, group: str | None = None, **flag_options):
    """A TrainConfig field: `default`, the flag's `help`, whether `--resume` checks it, and the
    argparse options of its flag (choices, nargs, const, type); `group` starts a `--help` section."""
    return field(default=default, metadata={"help": help, "resume": resume, "group": group, **flag_options})


def flag(key: str) -> str:
    """The command-line flag of a TrainConfig field: val_rows -> --val-rows."""
    return "--" + key.replace("_", "-")


@dataclass
class TrainConfig:
    """One training run's settings: train.py's flags, by the same names (see `--help`)."""
    model: str | None = setting(None, "HF model folder (default: the embedded SmolLM2-135M-Instruct)",
                                resume=True, group="model and data")
    cache_dir: str | None = setting(None, "where the default model is converted and kept")
    data: str | None = setting(None, "training rows: CSV / Parquet / JSONL (default: data/gsm8k_train.csv)",
                               resume=True)
    val_file: str | None = setting(None, "validation rows (default: data/gsm8k_val.csv with the default data, "
                                         "else a split of --data by question)", resume=True)
    val_fraction: float = setting(0.05, "share of questions held out when there is no --val-file", resume=True)
    val_rows: int | None = setting(None, "evaluate on at most this many validation rows (a seeded sample)",
                                   resume=True)
    out: str | None = setting(None, "output folder: adapters, checkpoint, metrics, plots (default: a new "
                                    "runs/run-NNN, linked as runs/latest; with --resume: runs/latest)")
    prompt_file: str | None = setting(None, "prompt template with {question} {answer} {solution} "
                                            "(default: built-in)", resume=True)
    max_seq_len: int = setting(512, "token limit per row; the solution's middle is cut", resume=True)
    skip_bad_rows: bool = setting(False, "skip and count bad rows instead of stopping")

    r: int = setting(32, "adapter rank", resume=True, group="LoRA")
    alpha: float = setting(64, "adapter scale numerator: s = alpha / r (> 0)", resume=True)
    dropout: float = setting(0.1, "dropout on the adapter input", resume=True)
    rslora: bool = setting(False, "rank-stabilised scale s = alpha / sqrt(r)", resume=True)
    targets: str = setting(",".join(ALL_PROJECTIONS), "comma-separated projections to adapt", resume=True)

    precision: str | None = setting(None, "storage of the block projections (default: int8, on every device)",
                                    resume=True, choices=PRECISIONS, group="precision and device")
    activations: str = setting("auto", "dtype an int8 / nf4 base computes in: auto = bf16 on a GPU and on a CPU "
                                       "with native bf16 (avx512_bf16, amx, arm64 bf16), else fp32", resume=True,
                               choices=ACTIVATIONS)
    device: str = setting("auto", "cuda, cpu or auto")

    lr: float = setting(4e-4, "peak learning rate (> 0)", resume=True, group="optimisation")
    scheduler: str = setting("cosine", "decay after warmup", resume=True, choices=("cosine", "linear", "constant"))
    warmup: float = setting(0.03, "warmup steps (>= 1) or fraction of --steps (< 1)", resume=True)
    batch_size: int = setting(4, "rows per micro-batch (per rank)", resume=True)
    grad_accum: int = setting(6, "micro-batches per optimizer step", resume=True)
    steps: int = setting(400, "optimizer steps", resume=True)
    loss: str = setting("answer", "answer: the label token only; full: every prompt token and the label",
                        resume=True, choices=("answer", "full"))
    optim: str = setting("adamw", "optimizer (adamw8bit: bitsandbytes' AdamW8bit)", resume=True,
                         choices=("adamw", "adamw8bit"))
    weight_decay: float = setting(0.0, "AdamW weight decay on A and B", resume=True)
    clip: float = setting(1.0, "gradient-norm clip (0: off)", resume=True)
    seed: int = setting(42, "data order, split, adapter init and dropout", resume=True)

    grad_checkpointing: str = setting(
        "auto", "recompute each block's activations in backward: less memory, ~30%% more compute "
                "(auto: on unless the step fits comfortably in free memory without it)",
        choices=("auto", "on", "off"), nargs="?", const="on", group="speed and memory")
    share_prefixes: str = setting(
        "on", "compute once what the rows of a batch start with in common (the instruction; with "
              "--group-by-question the question too); off gives the same numbers to float rounding, "
              "for a check or a bug report", resume=True, choices=("on", "off"))
    group_by_question: bool = setting(False, "put the rows of one question in the same micro-batch, so "
                                             "that they share the question too", resume=True)

    eval_every: int = setting(50, "evaluate every N steps (and at 0 and the end; 0: only those)",
                              group="evaluation and checkpoints")
    eval_batch_size: int = setting(16, "rows per forward pass when evaluating")
    save_every: int = setting(50, "checkpoint every N steps (and at the end)")
    resume: str | None = setting(None, "continue from OUT/checkpoint (or the given checkpoint folder)",
                                 nargs="?", const="")
    overwrite: bool = setting(False, "start afresh in an --out that holds another run")

    def __post_init__(self):
        for name in ("r", "batch_size", "grad_accum", "steps", "max_seq_len", "save_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag(name)} must be at least 1")
        if not 0 <= self.dropout < 1:  # (NaN fails every comparison: refused here too)
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        for name in ("alpha", "lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise UserError(f"{flag(name)} must be greater than 0 and finite, got {getattr(self, name)}")
        for name in ("weight_decay", "clip", "warmup", "eval_every"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"{flag(name)} must not be negative or non-finite, got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be in [0, {MAX_SEED}] (what numpy's and torch's generators take), "
                            f"got {self.seed}")
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


# Settings that must match for --resume to continue the same run exactly.
RESUME_KEYS = tuple(f.name for f in fields(TrainConfig) if f.metadata["resume"])


def argument_parser(description: str | None = None) -> argparse.ArgumentParser:
    """train.py's flags: one per TrainConfig field, by its name, with its default and help."""
    p = argparse.ArgumentParser(description=description)
    group = p
    for f in fields(TrainConfig):
        meta = dict(f.metadata)
        help_, title = meta.pop("help"), meta.pop("group")
        meta.pop("resume")
        if title:
            group = p.add_argument_group(title)
        default = None if f.default is MISSING else f.default
        if isinstance(default, bool):
            group.add_argument(flag(f.name), action="store_true", help=help_)
            continue
        if "choices" not in meta and "nargs" not in meta:
            meta["type"] = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        group.add_argument(flag(f.name), default=default, help=help_, **meta)
        if f.name == "grad_checkpointing":  # the short form of "off"
            group.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_const",
                               const="off", help="the same as --grad-checkpointing off")
    return p


def parse_train_args(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """The TrainConfig of a train.py command line (`--help` lists every flag)."""
    return TrainConfig(**vars(argument_parser(description).parse_args(argv)))
