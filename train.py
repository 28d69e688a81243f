"""Fine-tune a Llama with LoRA to judge whether an answer to a math question is correct.

    python train.py --r 32 --alpha 64 --steps 400                  # embedded default model + data
    python train.py --model Meta-Llama-3.1-8B --data train.csv ...  # a real checkpoint
    torchrun --nproc_per_node=4 -- train.py ...                      # data-parallel

One loop, no trainer framework: micro-batches → loss summed over target tokens and divided by
the target tokens of the whole accumulation window (of all ranks; engine/loss.py) → backward
with per-block activation checkpointing → all-reduce of the adapter gradients (DDP) → clip →
AdamW → warmup + cosine/linear schedule from `get_lr(step)`. Checkpoints are written atomically
and `--resume` continues exactly where the run stopped (same batches, same dropout masks, same
losses; engine/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.batches import LengthGroupedSampler, RowDataset
from engine import loss
from engine.checkpoint import (RunLock, checkpoint_problem, find_checkpoint, load_checkpoint, rng_state,
                               save_checkpoint, saved_args, saved_meta)
from engine.build import load_tokenizer
from engine.cli import UserError, run_cli
from engine.trainer import (RESUME_KEYS, MetricsLog, TrainConfig, all_reduce_grads, argument_parser, build_for_training,
                            decide_checkpointing, estimate_peak_gib, evaluate, flag, get_lr, load_data,
                            StopSignal, make_optimizer, plot, run_record, setup_distributed, truncated_share)
from lora.io import save_adapter
from model.default import default_model_dir
from model.precision import default_precision


def parse_args(argv=None) -> TrainConfig:
    """The command line (engine/trainer.py: argument_parser, `--help` for every flag) as a config."""
    return TrainConfig(**vars(argument_parser(__doc__.split("\n")[0]).parse_args(argv)))


# ----------------------------------------------------------------------------- the run's phases

def check_out_and_resume(cfg: TrainConfig, device: torch.device, main_proc: bool):
    """Phase 1, before anything heavy: (model folder, output folder, checkpoint to resume from,
    the run's record, the run folder's lock). Refuses a clobbered run, a folder in use, a missing
    or broken checkpoint, or one of a different run or of changed data."""
    if cfg.precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs CUDA (on CPU use fp32, bf16 or int8)")
    model_dir = Path(cfg.model) if cfg.model else default_model_dir(cfg.cache_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: not a model folder (no config.json)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    lock = None
    if main_proc:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out)  # held until the run ends, however it ends
        except OSError as e:
            raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        ckpt_dir = out / "checkpoint"
        if cfg.resume is not None:  # (validating a checkpoint reads it whole: only when it is needed)
            ckpt_dir = find_checkpoint(ckpt_dir if cfg.resume == "" else Path(cfg.resume))
        if cfg.resume is None and not cfg.overwrite and ((out / "checkpoint").exists() or (out / "metrics.jsonl").exists()):
            raise UserError(f"--out {out} holds another run: add --resume to continue it or --overwrite to start afresh")
        record = run_record(cfg, model_dir)
        if cfg.resume is not None:  # the run must be the same run, or "exact resume" is a lie
            problem = checkpoint_problem(ckpt_dir)
            if problem:
                raise UserError(f"--resume: no checkpoint in {ckpt_dir} is complete ({problem})")
            saved = saved_args(ckpt_dir)
            diff = [k for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
            if diff:
                raise UserError(f"--resume: {', '.join(map(flag, diff))} differ from the checkpoint's run "
                                f"({ckpt_dir / 'trainer.json'})")
            for side, now in record["data"].items():
                then = (saved_meta(ckpt_dir).get("data") or {}).get(side)
                if then and now and (then["size"], then["blake2b"]) != (now["size"], now["blake2b"]):
                    raise UserError(f"--resume: {now['path']} changed since the checkpoint was written "
                                    f"(size or content differs); resume with the same data or start afresh")
            if main_proc:
                print(f"resuming from {ckpt_dir} (step {saved_meta(ckpt_dir)['step']})", file=sys.stderr)
        if main_proc:
            (out / "args.json").write_text(json.dumps({**cfg.to_dict(), "model_dir": str(model_dir.resolve())},
                                                      indent=1))
    except BaseException:
        if lock:
            lock.release()
        raise
    return model_dir, out, ckpt_dir, record, lock


@dataclass
class Run:
    """What the loop works on, from set_up."""
    model: torch.nn.Module
    params: list
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    sampler: LengthGroupedSampler
    train_ds: RowDataset
    val_ds: RowDataset
    label_ids: tuple[int, int]
    step: int
    log: MetricsLog
    record: dict  # engine.trainer.run_record: written into every adapter file


def set_up(cfg: TrainConfig, model_dir: Path, out: Path, ckpt_dir: Path, record: dict, rank: int, world: int,
           device) -> Run:
    """Phase 2: tokenizer, data, model + adapters, optimizer; the checkpoint's state on --resume."""
    tok = load_tokenizer(model_dir)
    train_ds, val_ds, stats = load_data(cfg, tok)
    sampler = LengthGroupedSampler(train_ds.lengths, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)
    model, summary = build_for_training(cfg, model_dir, device)
    model.grad_checkpointing, ckpt_why = decide_checkpointing(model, cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    torch.manual_seed(cfg.seed + 1000 * rank)  # dropout masks: per rank, reproducible
    step = load_checkpoint(ckpt_dir, model, opt, scaler, sampler, device, rank, world) if cfg.resume is not None else 0
    log = MetricsLog(out / "metrics.jsonl", step, write=rank == 0)
    if rank == 0:
        mem = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
        print(f"model {model_dir} | {cfg.precision} on {device}" + (f" ({mem:.0f} GiB)" if mem else "")
              + f" | {summary}\n"
              f"tokenizer {tok.path} | labels \" True\" = {tok.label_ids()[0]}, \" False\" = {tok.label_ids()[1]}\n"
              f"data: {len(train_ds)} train rows ({stats.get('skipped', 0)} skipped, ~{truncated_share(train_ds):.0%} "
              f"longer than {cfg.max_seq_len} tokens and cut), {len(val_ds)} validation rows"
              f" | batch {cfg.batch_size} x accum {cfg.grad_accum} x {world} rank(s) = "
              f"{cfg.batch_size * cfg.grad_accum * world} rows per step | {cfg.steps} steps, loss={cfg.loss} | "
              f"estimated peak memory {estimate_peak_gib(model, cfg, model.grad_checkpointing):.1f} GiB | "
              f"gradient checkpointing {'on' if model.grad_checkpointing else 'off'} ({ckpt_why})",
              file=sys.stderr)
    return Run(model, params, opt, scaler, sampler, train_ds, val_ds, tok.label_ids(), step, log, record)


def finish(cfg: TrainConfig, run: Run, out: Path, model_dir: Path, best: tuple[float, int | None]) -> None:
    """Phase 4 (rank 0): the final adapter and summary.json."""
    save_adapter(run.model, out, base_model_name_or_path=str(model_dir), run=run.record)
    evals = [r for r in run.log.records if "eval" in r]
    summary = {"steps": run.step, "final": evals[-1]["eval"] if evals else None,
               "step0": evals[0]["eval"] if evals and evals[0]["step"] == 0 else None,
               "best_step": best[1], "best_accuracy": best[0],
               "final_threshold": evals[-1].get("threshold") if evals else None,
               "final_loss": next((r["loss"] for r in reversed(run.log.records) if "loss" in r), None)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    run.log.close()
    print(f"done: adapter in {out}/adapter_model.safetensors, best (step {best[1]}) in {out}/best", file=sys.stderr)


def save_all_ranks(cfg: TrainConfig, run: Run, out: Path, device, world: int, stop: StopSignal) -> Path:
    """The checkpoint at run.step, with every rank's RNG; rank 0 writes it. Returns its folder."""
    rngs = [rng_state(device)]
    if world > 1:  # each rank's dropout RNG, so every rank resumes its own stream
        rngs = [None] * world
        dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng_state(device).items()})
    if dist.is_initialized() and dist.get_rank() != 0:
        return out / "checkpoint"
    with stop.deferred(), disk_errors(out):  # a second signal now must not tear the save
        save_checkpoint(out / "checkpoint", run.model, run.opt, run.scaler, run.sampler, run.step, cfg.to_dict(),
                        run.record, rngs)
    return out / "checkpoint"


@contextlib.contextmanager
def disk_errors(out: Path):
    """A write that fails (a full disk, a read-only folder) ends the run with one line that says
    which checkpoint is intact; atomic writes leave the previous files as they were."""
    try:
        yield
    except OSError as e:
        intact = find_checkpoint(out / "checkpoint")
        keep = (f"the last complete checkpoint is {intact} (step {saved_meta(intact)['step']}): --resume continues "
                f"from it once there is room" if checkpoint_problem(intact) is None else "no checkpoint was written yet")
        raise UserError(f"cannot write in {out} ({e.strerror or e}); {keep}") from None


def main(argv=None) -> int:
    cfg = parse_args(argv)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        return train(cfg)
    finally:  # an in-process caller gets its Ctrl-C back
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> int:
    for key in ("model", "data", "val_file", "prompt_file"):  # recorded as absolute paths: a run
        if getattr(cfg, key):  # resumed, or scored, from another folder finds the same files
            setattr(cfg, key, str(Path(getattr(cfg, key)).resolve()))
    rank, world, device = setup_distributed(cfg.device)
    main_proc = rank == 0
    cfg.precision = cfg.precision or default_precision(device)
    model_dir, out, ckpt_dir, record, lock = check_out_and_resume(cfg, device, main_proc)
    try:
        return loop(cfg, set_up(cfg, model_dir, out, ckpt_dir, record, rank, world, device), rank, world, device,
                    model_dir, out, ckpt_dir)
    finally:
        if lock:
            lock.release()


def loop(cfg: TrainConfig, run: Run, rank: int, world: int, device, model_dir: Path, out: Path, ckpt_dir: Path) -> int:
    """Phase 3: the training loop, with evaluation and checkpoints; then phase 4."""
    main_proc = rank == 0
    model, opt, scaler, params, log = run.model, run.opt, run.scaler, run.params, run.log

    stop = StopSignal()  # SIGTERM / Ctrl-C: finish the step in flight, checkpoint, exit

    best = max(((r["eval"]["accuracy"], r["step"]) for r in log.records if "eval" in r),
               key=lambda b: b[0], default=(-1.0, None))  # the first of equals: as `>` picks
    def eval_and_keep_best(step):
        nonlocal best
        m, th = evaluate(model, run.val_ds, cfg, device, run.label_ids, step, log)
        run.record.update(threshold=th["threshold"], threshold_rows=th["rows"])  # carried by the adapters saved next
        if m["accuracy"] > best[0]:
            best = (m["accuracy"], step)
            save_adapter(model, out / "best", base_model_name_or_path=str(model_dir), run=run.record)  # step 0: the base
    if run.step == 0 and main_proc:
        eval_and_keep_best(0)
    if world > 1:
        dist.barrier()

    model.train()
    step = run.step
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not main_proc, file=sys.stderr)
    t_last = time.perf_counter()
    while step < cfg.steps:
        lr = get_lr(step, lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup_steps, scheduler=cfg.scheduler)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [run.train_ds.batch(run.sampler.next_batch()) for _ in range(cfg.grad_accum)]
        n_targets = torch.tensor(float(loss.count_targets(batches)), device=device)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        if world > 1:
            dist.all_reduce(n_targets)  # normalise by the whole window's targets, over all ranks
        loss_sum = loss.accumulate(model, batches, cfg.loss, device, n_targets, scaler)
        if world > 1:  # one all-reduce of the adapter gradients per step, none per micro-batch
            loss_sum = all_reduce_grads(params, loss_sum, device)
        last_good = lambda: f"Last good checkpoint: {ckpt_dir}" if ckpt_dir.exists() else "No checkpoint was written yet."
        if not math.isfinite(loss_sum):
            raise UserError(f"non-finite loss ({loss_sum}) at step {step}; stopping. {last_good()}")
        if scaler:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf")).item()
        if not scaler and not math.isfinite(gnorm):  # (with fp16 the scaler skips such steps itself)
            raise UserError(f"non-finite gradient norm at step {step}; stopping before it reaches the adapter. "
                            f"{last_good()}")
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        step = run.step = step + 1

        now = time.perf_counter()
        tok_s = n_tokens * world / (now - t_last)
        t_last = now
        rec = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": gnorm, "tokens_per_s": round(tok_s, 1)}
        if device.type == "cuda":
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        log(rec)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        bar.update(1)

        last_step = step == cfg.steps
        if world > 1:  # every rank stops after the same step, or the others hang in all_reduce
            stop.agree(device)
        if main_proc and not stop.signal and (last_step or cfg.eval_every and step % cfg.eval_every == 0):
            eval_and_keep_best(step)
            plot(out, log.records)
        if world > 1:
            dist.barrier()
        if last_step or step % cfg.save_every == 0 or stop.signal:
            ckpt_dir = save_all_ranks(cfg, run, out, device, world, stop)
            if stop.signal:
                bar.close()
                print(f"signal {stop.signal}: checkpoint written to {ckpt_dir} at step {step}; "
                      f"continue with --resume", file=sys.stderr)
                return 128 + stop.signal
    bar.close()

    if main_proc:
        with disk_errors(out):
            finish(cfg, run, out, model_dir, best)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_cli(main)
