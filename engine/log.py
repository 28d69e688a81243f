"""The run's metrics: metrics.jsonl (one JSON record per step and per evaluation) and loss.png."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def json_line(rec: dict) -> str:
    """`rec` as one line of strict JSON, which has no NaN or Infinity: a non-finite number is
    written as null (an fp16 step that the GradScaler skips logs an infinite gradient norm)."""
    def finite(v):
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps(finite(rec), allow_nan=False)


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
            self.file.write(json_line(r) + "\n")

    def __call__(self, rec: dict) -> None:
        self.records.append(rec)
        if self.file:
            self.file.write(json_line(rec) + "\n")
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
