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


def trailing_mean(values: list[float], k: int) -> list[float]:
    """values[i] replaced by the mean of values[max(0, i - k + 1) : i + 1]."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def plot(out: Path, records: list[dict]) -> None:
    """loss.png: the training loss per step (faint) and its trailing mean (left axis); validation
    accuracy at 0.5, accuracy at the tuned threshold (tuned on those same rows, so optimistic) and
    ROC-AUC at each evaluation (right axis), as points: evaluations are far apart, and a line
    between two of them would look like a trend nobody measured. The legend sits below the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    ev = [r for r in records if "eval" in r]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    if tr:
        steps, losses = zip(*tr)
        k = max(1, min(50, len(losses) // 10))  # a step's loss is a few rows' worth: noisy
        ax.plot(steps, losses, color="tab:blue", linewidth=0.8, alpha=0.3, label="train loss, per step")
        ax.plot(steps, trailing_mean(list(losses), k), color="tab:blue", linewidth=1.6,
                label=f"train loss, mean of the last {k} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    points = (("val accuracy (cut 0.5)", "o", "tab:orange", lambda r: r["eval"]["accuracy"]),
              ("val accuracy, tuned threshold", "^", "tab:red",
               lambda r: (r.get("threshold") or {}).get("accuracy_at_threshold")),
              ("val ROC-AUC", "s", "tab:green", lambda r: r["eval"]["auc"]))
    for label, marker, color, value in points:
        xy = [(r["step"], value(r)) for r in ev if value(r) is not None]
        if xy:
            ax2.plot(*zip(*xy), linestyle="none", marker=marker, color=color, label=label)
    ax2.set_ylabel("validation accuracy, ROC-AUC")
    ax2.set_ylim(0, 1)
    if ax.get_lines() or ax2.get_lines():  # (a run stopped before its first step has neither yet)
        fig.legend(loc="lower center", ncol=3, frameon=False, fontsize="small")
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # room for the legend under the axes
    fig.savefig(out / "loss.png.tmp.png", dpi=100)
    plt.close(fig)
    os.replace(out / "loss.png.tmp.png", out / "loss.png")
