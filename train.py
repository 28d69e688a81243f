"""Fine-tune a Llama with LoRA to judge whether an answer to a math question is correct.

    python train.py --r 32 --alpha 64 --steps 400                  # embedded default model + data
    python train.py --model Meta-Llama-3.1-8B --data train.csv ...  # a real checkpoint
    torchrun --nproc_per_node=4 -- train.py ...                      # data-parallel

One loop, no trainer framework (`loop` below): per optimizer step, each micro-batch of the
accumulation window goes forward, its loss summed over the target tokens and divided by the
target count of the whole window (of all ranks), and backward; then (data-parallel) one
all-reduce of the adapter gradients, the clip, the AdamW step, and the learning rate of
`get_lr(step)` (warmup + cosine/linear). Whether each block's activations are recomputed in
backward (gradient checkpointing) is decided at set-up (`--grad-checkpointing auto`).
Checkpoints are written atomically and `--resume` continues exactly where the run stopped
(same batches, same dropout masks, same losses; engine/checkpoint.py).
"""
from __future__ import annotations

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

from common.errors import UserError, cli_entry
from data.batches import LengthGroupedSampler, RowDataset, row_tokens
from data.read import question_codes
from engine.build import check_model_dir, check_precision, load_tokenizer
from engine.checkpoint import (RunLock, checkpoint_problem, disk_errors, find_checkpoint, load_checkpoint, rng_state,
                               save_checkpoint, saved_args, saved_meta, set_rng_state)
from engine.config import RESUME_KEYS, TrainConfig, flag, parse_train_args
from engine.distributed import StopSignal, all_reduce_grads, setup_distributed
from engine.log import MetricsLog, plot
from engine.loss import compute_loss, count_targets
from engine.memory import decide_grad_checkpointing, estimate_peak_gib, peak_rss_gib, total_memory_gib, what_fits
from engine.optim import get_lr, make_optimizer
from engine.score import NonFiniteScores, ScoringStopped, evaluate
from engine.setup import (RUNS, build_for_training, clear_run, load_data, point_latest, run_folder, training_record,
                          truncated_share)
from lora.io import read_record, save_adapter
from model.default import default_model_dir
from model.precision import choose_activations, default_precision


# ----------------------------------------------------------------------------- the run's phases

def check_out_and_resume(cfg: TrainConfig, device: torch.device, main_proc: bool):
    """Phase 1, before anything heavy: (model folder, output folder, checkpoint to resume from,
    the training record, the run folder's lock). Refuses a clobbered run, a folder in use, a
    missing or broken checkpoint, or one of a different run or of changed data."""
    check_precision(cfg.precision, device)
    model_dir = check_model_dir(Path(cfg.model) if cfg.model else default_model_dir(cfg.cache_dir))
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.resolve().is_relative_to(model_dir.resolve()):  # (resolved: through any symlink)
        raise UserError(f"--out {out} is inside the base model folder {model_dir}; pick another folder")
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
        record = training_record(cfg, model_dir)
        if cfg.resume is not None:  # the run must be the same run, or "exact resume" is a lie
            problem = checkpoint_problem(ckpt_dir)
            if problem:
                raise UserError(f"--resume: no checkpoint in {ckpt_dir} is complete ({problem})")
            saved = saved_args(ckpt_dir)
            diff = [k for k in RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]  # (a newer setting
            # than the checkpoint is not checked: its run had that setting's old behaviour)
            if diff:
                raise UserError(f"--resume: {', '.join(map(flag, diff))} differ from the checkpoint's run "
                                f"({ckpt_dir / 'trainer.json'})")
            for side, now in record["data"].items():
                then = (saved_meta(ckpt_dir).get("data") or {}).get(side)
                if then and now and (then["size"], then["blake2b"]) != (now["size"], now["blake2b"]):
                    raise UserError(f"--resume: {now['path']} changed since the checkpoint was written "
                                    f"(size or content differs); resume with the same data or start afresh")
            # What the evaluations added to the record (the tuned threshold) lives in the checkpoint's
            # adapter header: every adapter written from now on carries it, the final one included.
            record = {**read_record(ckpt_dir), **record}
            if main_proc:
                print(f"resuming from {ckpt_dir} (step {saved_meta(ckpt_dir)['step']})", file=sys.stderr)
        if main_proc and cfg.overwrite and cfg.resume is None:
            removed = clear_run(out)  # (under the lock: no other run is writing here)
            if removed:
                print(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}", file=sys.stderr)
        if main_proc:
            (out / "args.json").write_text(json.dumps({**cfg.to_dict(), "model_dir": str(model_dir.resolve())},
                                                      indent=1))
    except BaseException:
        if lock:
            lock.release()
        raise
    return model_dir, out, ckpt_dir, record, lock


@dataclass
class TrainState:
    """What the loop works on, from set_up."""
    cfg: TrainConfig
    model: torch.nn.Module
    params: list  # the adapter's A and B: all that trains
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    sampler: LengthGroupedSampler
    train_ds: RowDataset
    val_ds: RowDataset
    label_ids: tuple[int, int]  # (" True", " False")
    step: int  # optimizer steps taken
    log: MetricsLog
    record: dict  # engine/setup.py: training_record, written into every adapter file
    model_dir: Path
    out: Path
    ckpt_dir: Path
    rank: int
    world: int
    device: torch.device
    plotted: int = -1  # how many metrics records loss.png last showed (an unchanged plot is not redrawn)


def set_up(cfg: TrainConfig, model_dir: Path, out: Path, ckpt_dir: Path, record: dict, rank: int, world: int,
           device, activations_why: str) -> TrainState:
    """Phase 2: tokenizer, data, model + adapters, optimizer; the checkpoint's state on --resume."""
    tok = load_tokenizer(model_dir)
    train_ds, val_ds, stats = load_data(cfg, tok)
    questions = question_codes(train_ds.df)[0] if cfg.group_by_question else None
    sampler = LengthGroupedSampler(train_ds.lengths, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                                   questions=questions)
    model, summary = build_for_training(cfg, model_dir, device)
    model.grad_checkpointing, why = decide_grad_checkpointing(model, cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    torch.manual_seed(cfg.seed + 1000 * rank)  # dropout masks: per rank, reproducible
    step = load_checkpoint(ckpt_dir, model, opt, scaler, sampler, device, rank, world) if cfg.resume is not None else 0
    log = MetricsLog(out / "metrics.jsonl", step, write=rank == 0)
    if rank == 0:
        mem = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
        print(f"model {model_dir} | {cfg.precision} on {device}" + (f" ({mem:.0f} GiB)" if mem else "")
              + f", activations {cfg.activations} ({activations_why}) | {summary}\n"
              f"tokenizer {tok.path} | labels \" True\" = {tok.label_ids()[0]}, \" False\" = {tok.label_ids()[1]}\n"
              f"data: {len(train_ds)} train rows ({stats.get('skipped', 0)} skipped, ~{truncated_share(train_ds):.0%} "
              f"longer than {cfg.max_seq_len} tokens and cut), {len(val_ds)} validation rows"
              f" | batch {cfg.batch_size} x accum {cfg.grad_accum} x {world} rank(s) = "
              f"{cfg.batch_size * cfg.grad_accum * world} rows per step | {cfg.steps} steps, loss={cfg.loss} | "
              f"estimated peak memory {estimate_peak_gib(model, cfg, model.grad_checkpointing):.1f} GiB | "
              f"gradient checkpointing {'on' if model.grad_checkpointing else 'off'} ({why})",
              file=sys.stderr)
        if stats.get("overlap"):
            print(stats["overlap"], file=sys.stderr)
    return TrainState(cfg, model, params, opt, scaler, sampler, train_ds, val_ds, tok.label_ids(), step, log, record,
                      model_dir, out, ckpt_dir, rank, world, device)


def finish(t: TrainState, best: tuple[float, int | None]) -> None:
    """Phase 4 (rank 0): the final adapter and summary.json."""
    save_adapter(t.model, t.out, base_model_name_or_path=str(t.model_dir), record=t.record)
    evals = [r for r in t.log.records if "eval" in r]
    summary = {"steps": t.step, "final": evals[-1]["eval"] if evals else None,
               "step0": evals[0]["eval"] if evals and evals[0]["step"] == 0 else None,
               "best_step": best[1], "best_accuracy": best[0],
               "final_threshold": evals[-1].get("threshold") if evals else None,
               "final_loss": next((r["loss"] for r in reversed(t.log.records) if "loss" in r), None)}
    (t.out / "summary.json").write_text(json.dumps(summary, indent=1))
    t.log.close()
    print(f"done: adapter in {t.out}/adapter_model.safetensors, best (step {best[1]}) in {t.out}/best", file=sys.stderr)


def main(argv=None) -> int:
    cfg = parse_train_args(argv, __doc__.split("\n")[0])
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        return train(cfg)
    finally:  # an in-process caller gets its Ctrl-C back
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])


def train(cfg: TrainConfig) -> int:
    for key in ("model", "data", "val_file", "prompt_file"):  # recorded as absolute paths: a run
        if getattr(cfg, key):  # resumed, or scored, from another folder finds the same files
            setattr(cfg, key, str(Path(getattr(cfg, key)).resolve()))
    rank, world, device = setup_distributed(cfg.device)
    cfg.precision = cfg.precision or default_precision(device)
    cfg.activations, why = choose_activations(cfg.precision, device, cfg.activations)  # recorded as resolved
    out, new = run_folder(cfg, rank, world)
    cfg.out = str(out)  # (args.json and the checkpoint record the folder chosen)
    if new and rank == 0:
        print(f"run folder {out} (new: no --out given; {RUNS / 'latest'} will point to it)", file=sys.stderr)
    model_dir, out, ckpt_dir, record, lock = check_out_and_resume(cfg, device, rank == 0)
    try:
        t = set_up(cfg, model_dir, out, ckpt_dir, record, rank, world, device, why)
        if new and rank == 0:  # once the run has started: a run that failed its set-up is not "latest"
            point_latest(out)
        return loop(t)
    finally:
        if lock:
            lock.release()


# ----------------------------------------------------------------------------- the loop

def loop(t: TrainState) -> int:
    """Phase 3: the training loop, with evaluation and checkpoints; then phase 4."""
    cfg, model, opt, scaler = t.cfg, t.model, t.opt, t.scaler
    stop = StopSignal()  # SIGTERM / Ctrl-C: finish the step in flight, checkpoint, exit
    best = max(((r["eval"]["accuracy"], r["step"]) for r in t.log.records if "eval" in r),
               key=lambda b: b[0], default=(-1.0, None))  # the first of equals: as `>` picks
    # Step 0's evaluation; on --resume, the checkpoint step's if a signal skipped or abandoned it.
    done = any("eval" in r and r["step"] == t.step for r in t.log.records)
    if t.rank == 0 and evaluation_step(cfg, t.step) and not done:
        best = evaluate_and_keep_best(t, best, stop)
    if t.world > 1:  # waits for rank 0's evaluation, as a barrier would, and shares a signal it got meanwhile
        stop.agree(t.device)
    if stop.signal:  # stopped during that evaluation: a checkpoint all the same, for --resume
        t.ckpt_dir = save_all_ranks(t, stop)
        return stopped(t, stop)

    model.train()
    bar = tqdm(total=cfg.steps, initial=t.step, desc="train", unit="step", disable=t.rank != 0, file=sys.stderr)
    share = cfg.share_prefixes == "on"  # (a batch computes its rows' shared start once)
    while t.step < cfg.steps:
        t0 = time.perf_counter()
        lr = get_lr(t.step, lr=cfg.lr, steps=cfg.steps, warmup=cfg.warmup_steps, scheduler=cfg.scheduler)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [t.train_ds.batch(t.sampler.next_batch(), share) for _ in range(cfg.grad_accum)]
        n_targets = torch.tensor(float(count_targets(batches)), device=t.device)
        if t.world > 1:
            dist.all_reduce(n_targets)  # normalise by the whole window's targets, over all ranks

        window_rng = rng_state(t.device)  # a retry after running out of memory draws the same dropout masks
        while True:
            try:
                loss_sum = 0.0
                for batch in batches:  # forward and backward, one micro-batch at a time; gradients add up
                    loss = compute_loss(model, batch, cfg.loss, t.device) / n_targets
                    (scaler.scale(loss) if scaler else loss).backward()
                    loss_sum += loss.item()
                break
            except torch.OutOfMemoryError:
                loss = None  # (its graph holds activations; the exception's frames go at the end of this block)
            out_of_memory(t, batches, window_rng)  # checkpointing on, then the same window again; or one line
        if t.world > 1:  # one all-reduce of the adapter gradients per step, none per micro-batch
            loss_sum = all_reduce_grads(t.params, loss_sum, t.device)
        if not math.isfinite(loss_sum):
            raise UserError(f"non-finite loss ({loss_sum}) at step {t.step}; stopping. {last_good(t)}")
        if scaler:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(t.params, cfg.clip if cfg.clip > 0 else float("inf")).item()
        if not scaler and not math.isfinite(gnorm):  # (with fp16 the scaler skips such steps itself)
            raise UserError(f"non-finite gradient norm at step {t.step}; stopping before it reaches the "
                            f"adapter. {last_good(t)}")
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        t.step += 1

        log_step(t, bar, loss_sum, lr, gnorm, sum(row_tokens(b) for b in batches), t0)
        last_step = t.step == cfg.steps
        if t.world > 1:  # every rank stops after the same step, or the others hang in all_reduce
            stop.agree(t.device)
        if t.rank == 0 and not stop.signal and evaluation_step(cfg, t.step):
            best = evaluate_and_keep_best(t, best, stop)
        if t.world > 1:  # as after step 0: wait for rank 0's evaluation, take any signal it got
            stop.agree(t.device)
        if last_step or t.step % cfg.save_every == 0 or stop.signal:
            t.ckpt_dir = save_all_ranks(t, stop)
            if stop.signal:
                bar.close()
                return stopped(t, stop)
    bar.close()

    if t.rank == 0:
        with disk_errors(t.out):
            finish(t, best)
    if t.world > 1:
        dist.destroy_process_group()
    return 0


def evaluation_step(cfg: TrainConfig, step: int) -> bool:
    """Step 0, every --eval-every steps, and the last."""
    return step == 0 or step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)


def evaluate_and_keep_best(t: TrainState, best: tuple[float, int | None], stop: StopSignal) -> tuple[float, int | None]:
    """Score the validation rows; the adapters saved from now on carry the tuned threshold; a new
    best accuracy saves the adapter to OUT/best (at step 0: the base, B = 0). A signal abandons
    the evaluation at its next batch: it has nothing to save, and the run is stopping."""
    try:
        m, th = evaluate(t.model, t.val_ds, t.cfg.eval_batch_size, t.device, t.label_ids, t.step, t.log,
                         share=t.cfg.share_prefixes == "on", should_stop=lambda: stop.signal is not None)
    except ScoringStopped:
        tqdm.write(f"step {t.step:>5} validation: abandoned (signal {stop.signal})", file=sys.stderr)
        return best
    except NonFiniteScores as e:  # never a "best", never a threshold: stop
        cause = "the base model's weights are not usable" if t.step == 0 else "lower --lr or --alpha"
        raise UserError(f"{e} ({cause}); stopping. {last_good(t)}") from None
    t.record.update(threshold=th["threshold"], threshold_rows=th["rows"])
    redraw(t)
    if m["accuracy"] > best[0]:
        best = (m["accuracy"], t.step)
        save_adapter(t.model, t.out / "best", base_model_name_or_path=str(t.model_dir), record=t.record)
    return best


def log_step(t: TrainState, bar, loss: float, lr: float, gnorm: float, n_tokens: int, t0: float) -> None:
    """One metrics.jsonl record per optimizer step, and the progress bar's numbers."""
    tok_s = n_tokens * t.world / (time.perf_counter() - t0)
    rec = {"step": t.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": round(tok_s, 1)}
    if t.device.type == "cuda":  # the GPU's allocator peak
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated(t.device) / 2**30, 2)
    rec["peak_rss_gib"] = round(peak_rss_gib(), 2)  # this process's peak host memory, on any device
    t.log(rec)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
    bar.update(1)


def save_all_ranks(t: TrainState, stop: StopSignal) -> Path:
    """The checkpoint at t.step, with every rank's RNG; rank 0 writes it. Returns its folder.
    An adapter that is no longer finite is never saved (every rank holds the same one: all stop)."""
    if not torch.stack([p.isfinite().all() for p in t.params]).all():
        raise UserError(f"the adapter is no longer finite at step {t.step} (the update overflowed: lower "
                        f"--lr or --alpha); stopping before it is saved. {last_good(t)}")
    rngs = [rng_state(t.device)]
    if t.world > 1:  # each rank's dropout RNG, so every rank resumes its own stream
        rngs = [None] * t.world
        dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng_state(t.device).items()})
    if t.rank == 0:
        with stop.deferred(), disk_errors(t.out):  # a second signal now must not tear the save
            save_checkpoint(t.out / "checkpoint", t.model, t.opt, t.scaler, t.sampler, t.step, t.cfg.to_dict(),
                            t.record, rngs)
        redraw(t)  # the metrics so far, drawn whenever a checkpoint is (a stop's included)
    return t.out / "checkpoint"


def redraw(t: TrainState) -> None:
    """loss.png from the metrics so far, unless it already shows them (an evaluation's step that
    is also a checkpoint's)."""
    if t.plotted != len(t.log.records):
        with disk_errors(t.out):
            plot(t.out, t.log.records)
        t.plotted = len(t.log.records)


def out_of_memory(t: TrainState, batches: list[dict], window_rng: dict) -> None:
    """After the device ran out of memory in the step's forward or backward: when
    --grad-checkpointing auto had chosen off, turn it on and return, for the loop to run the same
    window again (the same batches, from zeroed gradients, with the same dropout masks; checkpointing
    does not change the arithmetic, so the step is the one it would have been). Otherwise stop with
    one line saying what to change; the last checkpoint is untouched."""
    cfg, model = t.cfg, t.model
    t.opt.zero_grad(set_to_none=True)  # the window's partial gradients
    if t.device.type == "cuda":
        torch.cuda.empty_cache()
    shape = f"{cfg.batch_size} x up to {max(b['input_ids'].shape[1] for b in batches)} tokens"
    if cfg.grad_checkpointing == "auto" and not model.grad_checkpointing:
        model.grad_checkpointing = True
        set_rng_state(window_rng, t.device)
        print(f"step {t.step}: out of memory for micro-batches of {shape} without gradient checkpointing; "
              f"turning it on (--grad-checkpointing auto) and running the step again: the same arithmetic, "
              f"~30% more compute per step from now on", file=sys.stderr)
        return
    raise UserError(f"out of memory at step {t.step}: micro-batches of {shape} do not fit in the "
                    f"{total_memory_gib(t.device):.1f} GiB of {t.device} with gradient checkpointing "
                    f"{'on' if model.grad_checkpointing else 'off'}; use {what_fits(cfg, model.grad_checkpointing)}. "
                    f"{last_good(t)}")


def stopped(t: TrainState, stop: StopSignal) -> int:
    """The end of a run stopped by a signal, its checkpoint written: the exit code 128 + signal."""
    print(f"signal {stop.signal}: checkpoint written to {t.ckpt_dir} at step {t.step}; "
          f"continue with the same command plus --resume", file=sys.stderr)
    return 128 + stop.signal


def last_good(t: TrainState) -> str:
    """The last checkpoint and its step (its adapter is finite: save_all_ranks saves no other)."""
    if checkpoint_problem(t.ckpt_dir) is not None:
        return "No checkpoint was written yet."
    return f"Last good checkpoint: {t.ckpt_dir} (step {saved_meta(t.ckpt_dir)['step']})."


if __name__ == "__main__":
    cli_entry(main)
