"""The CPU peer: transformers + PEFT LoRA, trained on exactly the batches train.py draws.

Same model folder (the embedded SmolLM2-135M-Instruct unless --model), loaded by
`LlamaForCausalLM.from_pretrained(..., dtype=float32)`; PEFT LoRA with the same r, alpha,
dropout, rsLoRA and target projections; activation checkpointing through
`model.gradient_checkpointing_enable()` (non-reentrant, as ours); the same AdamW, learning rate
schedule (`engine.optim.get_lr`), clip and loss. The data are not re-implemented: train.py's
flags, by the same names and with the same defaults, become an `engine.config.TrainConfig`
(bench/common.py: train_config), and `engine.setup.load_data` + `data.batches.LengthGroupedSampler`
give the same rows, validation sample and batches, in the same order, as train.py with the same
--seed.

Loss (answer mode, as `engine.loss.compute_loss`): the body's hidden state at each row's cue goes
through the head, cross-entropy against the label token, summed, divided by the target count of
the whole accumulation window. `--peer-head full` instead takes `model(...).logits` (the head on
every position) and gathers the cue: what a plain transformers user would write; the default
gathers first, so both sides do the same arithmetic and the timing compares the libraries.
Full mode (`--loss full`): every target of the window, through the chunk-free HF head.

Scoring (validation and bench/score_cpu.py) is the usual HF pattern: each batch (rows in order
of character length, as `engine.score.score` did before it sorted by token count) is
left-padded, positions come from the mask, `logits_to_keep=1` keeps the last position (the
cue), p_true = softmax(logit " True", logit " False").

Same random numbers too: PEFT builds its lora_A / lora_B in the same module order as our
`apply_lora` and draws from the torch RNG in the same order (nn.Linear init, then Kaiming-uniform
A, zero B), and both dropouts act on the adapter input, called in the same order after the
same `torch.manual_seed(seed)` that train.py sets. So with the same --seed the adapter starts
bit-identical (checked: max |A_ours - A_peer| = 0), and with DROPOUT_MASKS=torch (ours then draws
torch's F.dropout masks, as PEFT's nn.Dropout does, not lora/lora.py's cheaper dropout_bits) the
dropout masks coincide too; the two runs differ only by floating-point rounding (different op
order inside the libraries), which bench/train_cpu.py shows as the largest per-step loss
difference. From the repository root:

    python -m bench.peer_cpu --steps 3 --val-rows 16 --max-seq-len 256   # the peer alone
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import model_dir_of, step_stats, train_config
from data.batches import LengthGroupedSampler
from engine.score import format_metrics, metrics
from engine.config import TrainConfig
from engine.optim import get_lr
from data.read import question_codes
from engine.setup import load_data
from model.precision import default_precision
from model.tokenizer import Tokenizer

# peft calls transformers' deprecated gradient-checkpointing helpers; not ours to fix.
warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def enable_checkpointing(hf) -> None:
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_peer(model_dir: Path, args: TrainConfig, dtype: torch.dtype = torch.float32):
    """HF LlamaForCausalLM (fp32, or `dtype`) + PEFT LoRA as `args` say, initialised from
    torch.manual_seed(args.seed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    hf.config.use_cache = False
    if args.grad_checkpointing != "off":  # as a transformers + PEFT user runs the QLoRA recipe
        enable_checkpointing(hf)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, use_rslora=args.rslora,
                     target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)  # as build_for_training does before apply_lora: the same A (see docstring)
    return get_peft_model(hf, cfg)


def parts(pm):
    """(LlamaModel body with LoRA inside, lm_head) of a PeftModel."""
    causal = pm.base_model.model
    return causal.model, causal.lm_head


def peer_loss(pm, batch: dict, loss_mode: str, head: str = "gather") -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (fp32), like engine.loss.compute_loss."""
    ids, mask, targets, cue = batch["input_ids"], batch["attention_mask"], batch["targets"], batch["cue_pos"]
    rows = torch.arange(ids.shape[0])
    if loss_mode == "answer":
        if head == "full":  # the plain transformers way: logits everywhere, then pick the cue
            logits = pm(input_ids=ids, attention_mask=mask.long()).logits[rows, cue]  # (B, V)
        else:
            body, lm_head = parts(pm)
            h = body(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, T, D)
            logits = lm_head(h[rows, cue])  # (B, V)
        return F.cross_entropy(logits.float(), targets[rows, cue], reduction="sum")
    logits = pm(input_ids=ids, attention_mask=mask.long()).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def left_pad(batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our right-padded batch as the (input_ids, attention_mask, position_ids) of a left-padded one."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, T = ids.shape
    n = mask.sum(1)  # (B,)
    shift = (torch.arange(T)[None, :] - (T - n)[:, None]) % T  # position t reads source (t - pad) mod T
    lids = torch.gather(ids, 1, shift)
    lmask = torch.arange(T)[None, :] >= (T - n)[:, None]
    lids = torch.where(lmask, lids, torch.full_like(lids, pad_id))
    pos = (lmask.long().cumsum(-1) - 1).clamp(min=0)
    return lids, lmask.long(), pos


@torch.no_grad()
def peer_score(pm, ds, batch_size: int, label_ids: tuple[int, int], pad_id: int) -> np.ndarray:
    """p_true per row of `ds` (row order), HF last-position logits, batches of rows in order of
    character length (engine.score.score re-sorts by token count within chunks of rows)."""
    was = pm.training
    pm.eval()
    order = np.argsort(ds.lengths, kind="stable").tolist()
    p_true = np.zeros(len(ds), dtype=np.float64)
    t_id, f_id = label_ids
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask, pos = left_pad(ds.batch(idx), pad_id)
        logits = pm(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]  # (B, V)
        p_true[idx] = torch.softmax(logits[:, [f_id, t_id]].float(), -1)[:, 1].double().numpy()
    pm.train(was)
    return p_true


def window_positions(cfg: TrainConfig, train_ds, n: int | None = None):
    """The first `n` (default cfg.steps) accumulation windows train.py draws, in order: a list of
    micro-batches (row positions) per optimizer step (its sampler, one rank; --group-by-question
    as train.py honours it)."""
    questions = question_codes(train_ds.df)[0] if cfg.group_by_question else None
    sampler = LengthGroupedSampler(train_ds.lengths, cfg.batch_size, seed=cfg.seed, questions=questions)
    for _ in range(cfg.steps if n is None else n):
        yield [sampler.next_batch() for _ in range(cfg.grad_accum)]


def windows(cfg: TrainConfig, train_ds, n: int | None = None):
    """window_positions as the micro-batch dicts of whole rows (what the peer computes)."""
    for w in window_positions(cfg, train_ds, n):
        yield [train_ds.batch(pos) for pos in w]


def setup(argv: list[str]):
    """(cfg, model_dir, tokenizer, train_ds, val_ds) from train.py flags, as train.py builds them
    (TrainConfig, then engine.setup.load_data); cfg.precision is train.py's default unless given."""
    cfg = train_config(argv)
    cfg.precision = cfg.precision or default_precision(torch.device("cpu"))  # ours as train.py runs it;
    # the peer is always the fp32 model (pass --precision fp32 to compare step by step)
    model_dir = model_dir_of(cfg)
    tok = Tokenizer.from_dir(model_dir)
    train_ds, val_ds, _ = load_data(cfg, tok)
    return cfg, model_dir, tok, train_ds, val_ds


def opt_step(params, opt, clip: float) -> float:
    """Clip the gradient norm (0: off) and step, as train.py does; returns the norm."""
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm


def train_peer(argv: list[str], head: str = "gather", log=print, clock=time.perf_counter) -> dict:
    """Run train.py's loop with the peer model. Returns per-step records and step-0 / final metrics.

    A step's time (on `clock`) runs from the end of the previous step to the end of this one and
    includes building its batches, as train.py's tokens_per_s does. Evaluation sits outside it.
    """
    cfg, model_dir, tok, train_ds, val_ds = setup(argv)
    pm = load_peer(model_dir, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)  # engine.optim.make_optimizer's
    labels = val_ds.df["is_correct"].to_numpy()
    label_ids = tok.label_ids()

    def evaluate(step):
        t = time.perf_counter()
        m = metrics(labels, peer_score(pm, val_ds, cfg.eval_batch_size, label_ids, tok.pad_id))
        log(f"peer step {step:>4} validation: {format_metrics(m)} ({time.perf_counter() - t:.0f} s)")
        return m

    eval0 = evaluate(0)
    torch.manual_seed(cfg.seed)  # dropout masks: train.py seeds the same way (rank 0)
    pm.train()
    recs, t_last = [], clock()
    sampler = LengthGroupedSampler(train_ds.lengths, cfg.batch_size, seed=cfg.seed)
    for step in range(cfg.steps):
        lr = get_lr(step, lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup_steps, scheduler=cfg.scheduler)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [train_ds.batch(sampler.next_batch()) for _ in range(cfg.grad_accum)]
        n_targets = float(sum(int((b["targets"] != -100).sum()) for b in batches))
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        loss_sum = 0.0
        for b in batches:
            loss = peer_loss(pm, b, cfg.loss, head) / n_targets
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise RuntimeError(f"peer: non-finite loss at step {step}")
        gnorm = opt_step(params, opt, cfg.clip)
        now = clock()
        recs.append({"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": gnorm, "tokens": n_tokens,
                     "seconds": now - t_last})
        log(f"peer step {step + 1:>4} loss {loss_sum:.4f} lr {lr:.2e} {now - t_last:.2f} s "
            f"{n_tokens / (now - t_last):.0f} tok/s")
        t_last = now
    final = evaluate(cfg.steps)
    return {"steps": recs, "eval0": eval0, "final": final}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peer_cpu",
                                description="the transformers + PEFT peer alone, on train.py's flags",
                                epilog="every other flag is train.py's (python train.py --help), with TrainConfig's defaults")
    p.add_argument("--peer-head", choices=["gather", "full"], default="gather",
                   help="gather: head at the cue only (same work as ours); full: logits at every position")
    mine, rest = p.parse_known_args(argv)
    r = train_peer(rest, mine.peer_head)
    med, tps = step_stats([s["seconds"] for s in r["steps"]], [s["tokens"] for s in r["steps"]])
    print(f"| step s (median, excl. 1st) | tokens/s | acc 0 | auc 0 | acc end | auc end |\n| --- | --- | --- | --- | --- | --- |\n"
          f"| {med:.3f} | {tps:.0f} | {r['eval0']['accuracy']:.4f} | {r['eval0']['auc']:.4f} "
          f"| {r['final']['accuracy']:.4f} | {r['final']['auc']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
