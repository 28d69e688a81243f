"""Fine-tune a Llama with LoRA to judge whether an answer to a math question is correct.

    python train.py --r 32 --alpha 64 --steps 400                  # embedded default model + data
    python train.py --model Meta-Llama-3.1-8B --data train.csv ...  # a real checkpoint
    torchrun --nproc_per_node=4 train.py ...                         # data-parallel

One loop, no trainer framework: micro-batches → loss summed over target tokens and divided by
the target tokens of the whole accumulation window (of all ranks) → backward with per-block
activation checkpointing → all-reduce of the adapter gradients (DDP) → clip → AdamW → warmup +
cosine/linear schedule from `get_lr(step)`. Checkpoints are written atomically and `--resume`
continues exactly where the run stopped (same batches, same dropout masks, same losses).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import kernels
import predict
from data.dataset import DEFAULT_PROMPT, Encoder, LengthGroupedSampler, RowDataset, load_prompt, \
    read_table, split_by_question
from predict import UserError, default_precision, format_metrics, metrics, resolve_device, score

REPO = Path(__file__).resolve().parent
# Rank 0 evaluates alone while the others wait in a barrier: allow for a long validation pass.
DIST_TIMEOUT = datetime.timedelta(hours=2)
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# Arguments that must match for --resume to continue the same run exactly.
RESUME_KEYS = ("model", "data", "val_file", "val_fraction", "r", "alpha", "dropout", "rslora", "targets",
               "precision", "batch_size", "grad_accum", "max_seq_len", "loss", "optim", "seed", "prompt_file",
               "lr", "scheduler", "warmup", "steps", "clip", "weight_decay", "val_rows")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # model and data
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", help="where the default model is converted and kept")
    p.add_argument("--data", help="training rows: CSV / Parquet / JSONL (default: data/gsm8k_train.csv)")
    p.add_argument("--val-file", help="validation rows (default: data/gsm8k_val.csv with the default data, "
                                      "else a split of --data by question)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of questions held out when there is no --val-file")
    p.add_argument("--val-rows", type=int, help="evaluate on at most this many validation rows (a seeded sample)")
    p.add_argument("--out", default="runs/default", help="output folder: adapters, checkpoint, metrics, plots")
    p.add_argument("--prompt-file", help="prompt template with {question} {answer} {solution} (default: built-in)")
    p.add_argument("--max-seq-len", type=int, default=512, help="token limit per row; the solution's middle is cut")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    # LoRA
    p.add_argument("--r", type=int, default=32, help="adapter rank")
    p.add_argument("--alpha", type=float, default=64, help="adapter scale numerator: s = alpha / r")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout on the adapter input")
    p.add_argument("--rslora", action="store_true", help="rank-stabilised scale s = alpha / sqrt(r)")
    p.add_argument("--targets", default=TARGETS, help="comma-separated projections to adapt")
    # precision and device
    p.add_argument("--precision", choices=["int8", "nf4", "bf16", "fp16", "fp32"],
                   help="base weights (default: int8 on CUDA; fp32 on CPU, where it is exact and fastest)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    # optimisation
    p.add_argument("--lr", type=float, default=4e-4, help="peak learning rate")
    p.add_argument("--scheduler", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warmup")
    p.add_argument("--warmup", type=float, default=0.03, help="warmup steps (>= 1) or fraction of --steps (< 1)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch (per rank)")
    p.add_argument("--grad-accum", type=int, default=6, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--loss", choices=["answer", "full"], default="answer",
                   help="answer: the label token only; full: every prompt token and the label")
    p.add_argument("--optim", choices=["adamw", "adamw8bit"], default="adamw", help="optimizer")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on A and B")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block's activations in backward (less memory, ~30%% more compute)")
    p.add_argument("--seed", type=int, default=42, help="data order, split, adapter init and dropout")
    # evaluation and checkpoints
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (and at 0 and the end; 0: only those)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="rows per forward pass when evaluating")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from OUT/checkpoint (or the given checkpoint folder)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds another run")
    args = p.parse_args(argv)
    for name in ("r", "batch_size", "grad_accum", "steps", "max_seq_len", "save_every", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.dropout < 1:
        raise UserError("--dropout must be in [0, 1)")
    if not 0 < args.val_fraction < 1:
        raise UserError("--val-fraction must be in (0, 1)")
    return args


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


def compute_loss(model, batch: dict, loss_mode: str, device) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (fp32)."""
    ids, mask, targets = batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["targets"].to(device)
    if loss_mode == "answer":  # one target per row, at the cue: the head runs there only
        logits = model(ids, mask, logits_at=batch["cue_pos"].to(device))  # (B, V)
        return F.cross_entropy(logits.float(), targets.gather(1, batch["cue_pos"].to(device)[:, None])[:, 0],
                               reduction="sum")
    h = model.hidden(ids, mask)  # (B, T, D)
    # Chunked: the (tokens x vocabulary) fp32 logits never exist all at once, in forward or backward.
    total, _ = kernels.chunked_cross_entropy(h.reshape(-1, h.shape[-1]), model.output_weight, targets.reshape(-1))
    return total


def accumulate(model, batches: list[dict], loss_mode: str, device, n_targets: torch.Tensor, scaler=None) -> float:
    """Backward over the micro-batches of one optimizer step; returns the window's mean loss.

    Each micro-batch's summed loss is divided by the target count of the WHOLE window (all
    ranks), so 2 x batch 2 gives the same gradient as 1 x batch 4, whatever the row lengths.
    """
    total = 0.0
    for b in batches:
        loss = compute_loss(model, b, loss_mode, device) / n_targets
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.item()
    return total


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


# ----------------------------------------------------------------------------- checkpoints

def atomic_write_dir(final: Path, write) -> None:
    """Write a folder via `write(tmp)`, then swap it in: a crash leaves the old or the new one."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path) -> Path:
    """`path`, or what a crash in atomic_write_dir's two renames left: a complete .tmp or the .old."""
    for cand in (path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
        if (cand / "trainer.json").is_file():  # trainer.json is written last
            return cand
    return path


def flatten_state(obj, prefix="") -> tuple[dict, object]:
    """Split a nested state (optimizer, RNG) into safetensors-able tensors and a JSON skeleton."""
    tensors = {}
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu", copy=True).contiguous()  # own memory: bnb shares qmaps
        return tensors, {"__tensor__": prefix}
    if isinstance(obj, dict):
        skel = {}
        for k, v in obj.items():
            t, skel[str(k)] = flatten_state(v, f"{prefix}.{k}" if prefix else str(k))
            tensors.update(t)
        return tensors, {"__dict__": skel, "__int_keys__": all(isinstance(k, int) for k in obj)}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, f"{prefix}.{i}") for i, v in enumerate(obj)]
        for t, _ in items:
            tensors.update(t)
        return tensors, {"__list__": [s for _, s in items]}
    return tensors, obj


def unflatten_state(skel, tensors: dict):
    if isinstance(skel, dict) and "__tensor__" in skel:
        return tensors[skel["__tensor__"]]
    if isinstance(skel, dict) and "__dict__" in skel:
        conv = int if skel["__int_keys__"] and skel["__dict__"] else str
        return {conv(k): unflatten_state(v, tensors) for k, v in skel["__dict__"].items()}
    if isinstance(skel, dict) and "__list__" in skel:
        return [unflatten_state(v, tensors) for v in skel["__list__"]]
    return skel


def parse_json_line(line: str) -> dict | None:
    try:  # a line torn by a kill mid-write is dropped, not fatal
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path: Path, model, opt, scaler, sampler, step: int, args, base_name: str,
                    rngs: list[dict]) -> None:
    from lora.io import save_adapter

    def write(tmp: Path):
        save_adapter(model, tmp, base_model_name_or_path=base_name)
        state = {"optimizer": opt.state_dict(), "rng": rngs,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        tensors, skel = flatten_state(state)
        save_file(tensors, str(tmp / "state.safetensors"))  # no pickles: loading runs no code
        meta = {"step": step, "sampler": sampler.state_dict(), "state": skel, "args": vars(args)}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))

    atomic_write_dir(path, write)


def load_checkpoint(path: Path, model, opt, scaler, sampler, device, rank: int, world: int) -> int:
    from lora.io import load_adapter
    load_adapter(model, path)
    meta = json.loads((path / "trainer.json").read_text())
    state = unflatten_state(meta["state"], load_file(str(path / "state.safetensors")))
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) != world:
        raise UserError(f"--resume: the checkpoint was written by {len(state['rng'])} rank(s), this run has {world}")
    rng = state["rng"][rank]
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    sampler.load_state_dict(meta["sampler"])
    return meta["step"]


# ----------------------------------------------------------------------------- setup

def setup_distributed(device_arg: str):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
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


def load_data(args, tok, rank: int):
    default = args.data is None
    data = Path(args.data) if args.data else REPO / "data" / "gsm8k_train.csv"
    template = load_prompt(args.prompt_file) if args.prompt_file else DEFAULT_PROMPT
    df, stats = read_table(data, skip_bad_rows=args.skip_bad_rows, require_label=True)
    val_file = args.val_file or (REPO / "data" / "gsm8k_val.csv" if default else None)
    if val_file:
        val_df, _ = read_table(val_file, skip_bad_rows=args.skip_bad_rows, require_label=True)
    else:
        df, val_df = split_by_question(df, args.val_fraction, args.seed)
    if args.val_rows and len(val_df) > args.val_rows:
        val_df = val_df.sample(n=args.val_rows, random_state=args.seed).sort_index()
    train_ds = RowDataset(df.reset_index(drop=True), Encoder(tok, template, args.max_seq_len, args.loss), pad_id=tok.pad_id)
    val_ds = RowDataset(val_df.reset_index(drop=True), Encoder(tok, template, args.max_seq_len, "answer"), pad_id=tok.pad_id)
    return train_ds, val_ds, stats


def build(args, model_dir: Path, device, precision: str):
    from lora.inject import apply_lora, mark_only_lora_trainable, param_summary
    model = predict.build_model(model_dir, precision, device)
    torch.manual_seed(args.seed)  # adapter init
    bad = [t for t in args.targets.split(",") if t.strip() and t.strip().split(".")[-1] not in TARGETS.split(",")]
    if bad:
        raise UserError(f"--targets: {', '.join(bad)} not supported (choose from {TARGETS})")
    try:
        apply_lora(model, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                   r=args.r, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora)
    except ValueError as e:
        raise UserError(f"--targets {args.targets}: {e}") from None
    mark_only_lora_trainable(model)
    model.to(device)
    model.grad_checkpointing = args.grad_checkpointing
    return model, param_summary(model)


def estimate_peak_gib(model, args, act_bytes: int) -> float:
    """A rough device-memory estimate: weights + adapter training state + activations."""
    cfg = model.cfg
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adam = lora * (4 + 4 + (2 if args.optim == "adamw8bit" else 8))  # grad + two moments
    tokens = args.batch_size * args.max_seq_len
    per_layer_full = tokens * (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * act_bytes
    layers = cfg.num_hidden_layers
    acts = (layers * tokens * cfg.hidden_size * act_bytes + per_layer_full if args.grad_checkpointing
            else layers * per_layer_full)
    head = (args.batch_size if args.loss == "answer" else 1024) * cfg.vocab_size * 4 * 2
    return (weights + adam + acts + head) / 2**30


def make_optimizer(args, params):
    if args.optim == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def truncated_share(ds: RowDataset, n: int = 200) -> float:
    """Share of rows cut to fit --max-seq-len, from a fixed sample (tokenizing all would be slow)."""
    sample = np.random.default_rng(0).choice(len(ds), size=min(n, len(ds)), replace=False)
    return float(np.mean([ds[int(i)]["truncated"] for i in sample])) if len(ds) else 0.0


def evaluate(model, val_ds, args, device, label_ids, step, log) -> dict:
    p = score(model, val_ds, args.eval_batch_size, device, label_ids)
    m = metrics(val_ds.df["is_correct"].to_numpy(), p)
    log({"step": step, "eval": m})
    tqdm.write(f"step {step:>5} validation: {format_metrics(m)}", file=sys.stderr)
    return m


def plot(out: Path, records: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    ev = [(r["step"], r["eval"]["accuracy"]) for r in records if "eval" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    if ev:
        ax2.plot(*zip(*ev), "o-", label="val accuracy", color="tab:orange")
    ax2.set_ylabel("validation accuracy")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "loss.png.tmp.png", dpi=100)
    plt.close(fig)
    os.replace(out / "loss.png.tmp.png", out / "loss.png")


# ----------------------------------------------------------------------------- the loop

def main(argv=None) -> int:
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        return run(argv)
    finally:  # an in-process caller gets its Ctrl-C back
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])


def run(argv=None) -> int:
    args = parse_args(argv)
    from lora.io import save_adapter
    from model.default import default_model_dir
    from model.tokenizer import Tokenizer

    rank, world, device = setup_distributed(args.device)
    main_proc = rank == 0
    precision = args.precision = args.precision or default_precision(device)
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs CUDA (on CPU use fp32, bf16 or int8)")
    model_dir = Path(args.model) if args.model else default_model_dir(args.cache_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir}: not a model folder (no config.json)")
    out = Path(args.out)
    ckpt_dir = find_checkpoint(out / "checkpoint" if args.resume in (None, "") else Path(args.resume))
    if args.resume is not None and not (ckpt_dir / "trainer.json").is_file():
        raise UserError(f"--resume: no checkpoint in {ckpt_dir}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if args.resume is None and not args.overwrite and ((out / "checkpoint").exists() or (out / "metrics.jsonl").exists()):
        raise UserError(f"--out {out} holds another run: add --resume to continue it or --overwrite to start afresh")
    if args.resume is not None:  # the run must be the same run, or "exact resume" is a lie
        saved = json.loads((ckpt_dir / "trainer.json").read_text())["args"]
        diff = [k for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
        if diff:
            raise UserError(f"--resume: {', '.join(f'--{k.replace(chr(95), chr(45))}' for k in diff)} "
                            f"differ from the checkpoint's run ({ckpt_dir / 'trainer.json'})")
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps({**vars(args), "model_dir": str(model_dir)}, indent=1))

    tok = Tokenizer.from_dir(model_dir)
    label_ids = tok.label_ids()
    train_ds, val_ds, stats = load_data(args, tok, rank)
    sampler = LengthGroupedSampler(train_ds.lengths, args.batch_size, seed=args.seed, rank=rank, world_size=world)
    model, summary = build(args, model_dir, device, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(args, params)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    warmup = int(args.warmup) if args.warmup >= 1 else int(args.warmup * args.steps)
    lr_at = lambda s: get_lr(s, lr=args.lr, steps=args.steps, warmup=warmup, scheduler=args.scheduler)

    torch.manual_seed(args.seed + 1000 * rank)  # dropout masks: per rank, reproducible
    step = load_checkpoint(ckpt_dir, model, opt, scaler, sampler, device, rank, world) if args.resume is not None else 0
    records = []
    if step and (out / "metrics.jsonl").is_file():  # keep the history up to the checkpoint
        records = [r for r in map(parse_json_line, (out / "metrics.jsonl").read_text().splitlines())
                   if r and r["step"] <= step]
    metrics_file = None
    if main_proc:
        metrics_file = open(out / "metrics.jsonl", "w")
        for r in records:
            metrics_file.write(json.dumps(r) + "\n")

    def log(rec):
        records.append(rec)
        if metrics_file:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()

    if main_proc:
        mem = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
        print(f"model {model_dir} | {precision} on {device}" + (f" ({mem:.0f} GiB)" if mem else "")
              + f" | {summary}\n"
              f"data: {len(train_ds)} train rows ({stats.get('skipped', 0)} skipped, ~{truncated_share(train_ds):.0%} "
              f"longer than {args.max_seq_len} tokens and cut), {len(val_ds)} validation rows"
              f" | batch {args.batch_size} x accum {args.grad_accum} x {world} rank(s) = "
              f"{args.batch_size * args.grad_accum * world} rows per step | {args.steps} steps, loss={args.loss} | "
              f"estimated peak memory {estimate_peak_gib(model, args, 4 if precision == 'fp32' else 2):.1f} GiB",
              file=sys.stderr)

    stop = {"signal": None}
    def on_signal(signum, _frame):
        if stop["signal"]:  # a second Ctrl-C: stop now, keep the last checkpoint
            raise KeyboardInterrupt
        stop["signal"] = signum  # finish the step in flight, checkpoint, exit
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    best_acc, best_step = -1.0, None
    for r in records:
        if "eval" in r and r["eval"]["accuracy"] > best_acc:
            best_acc, best_step = r["eval"]["accuracy"], r["step"]
    if step == 0 and main_proc:
        m = evaluate(model, val_ds, args, device, label_ids, 0, log)
        best_acc, best_step = m["accuracy"], 0
        save_adapter(model, out / "best", base_model_name_or_path=str(model_dir))  # B = 0: the base model
    if world > 1:
        dist.barrier()

    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", disable=not main_proc, file=sys.stderr)
    t_last = time.perf_counter()
    while step < args.steps:
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [train_ds.batch(sampler.next_batch()) for _ in range(args.grad_accum)]
        n_targets = torch.tensor(float(sum(int((b["targets"] != -100).sum()) for b in batches)), device=device)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        if world > 1:
            dist.all_reduce(n_targets)  # normalise by the whole window's targets, over all ranks
        loss_sum = accumulate(model, batches, args.loss, device, n_targets, scaler)
        if world > 1:  # one all-reduce of the adapter gradients per step, none per micro-batch
            loss_sum = all_reduce_grads(params, loss_sum, device)
        if not math.isfinite(loss_sum):
            last = ckpt_dir if ckpt_dir.exists() else None
            raise UserError(f"non-finite loss ({loss_sum}) at step {step}; stopping. "
                            + (f"Last good checkpoint: {last}" if last else "No checkpoint was written yet."))
        if scaler:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf")).item()
        if not scaler and not math.isfinite(gnorm):  # (with fp16 the scaler skips such steps itself)
            raise UserError(f"non-finite gradient norm at step {step}; stopping before it reaches the adapter. "
                            + (f"Last good checkpoint: {ckpt_dir}" if ckpt_dir.exists() else "No checkpoint was written yet."))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        now = time.perf_counter()
        tok_s = n_tokens * world / (now - t_last)
        t_last = now
        rec = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": gnorm, "tokens_per_s": round(tok_s, 1)}
        if device.type == "cuda":
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        log(rec)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        bar.update(1)

        last_step = step == args.steps
        if world > 1:  # every rank stops after the same step, or the others hang in all_reduce
            flag = torch.tensor([float(stop["signal"] or 0)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop["signal"] = int(flag.item()) or None
        if main_proc and not stop["signal"] and (last_step or args.eval_every and step % args.eval_every == 0):
            m = evaluate(model, val_ds, args, device, label_ids, step, log)
            if m["accuracy"] > best_acc:
                best_acc, best_step = m["accuracy"], step
                save_adapter(model, out / "best", base_model_name_or_path=str(model_dir))
            plot(out, records)
        if world > 1:
            dist.barrier()
        if last_step or step % args.save_every == 0 or stop["signal"]:
            rngs = [rng_state(device)]
            if world > 1:  # each rank's dropout RNG, so every rank resumes its own stream
                rngs = [None] * world
                dist.all_gather_object(rngs, {k: v.cpu() for k, v in rng_state(device).items()})
            if main_proc:
                save_checkpoint(out / "checkpoint", model, opt, scaler, sampler, step, args, str(model_dir), rngs)
            ckpt_dir = out / "checkpoint"
            if stop["signal"]:
                bar.close()
                print(f"signal {stop['signal']}: checkpoint written to {ckpt_dir} at step {step}; "
                      f"continue with --resume", file=sys.stderr)
                return 128 + stop["signal"]
    bar.close()

    if main_proc:
        save_adapter(model, out, base_model_name_or_path=str(model_dir))
        evals = [r for r in records if "eval" in r]
        summary_d = {"steps": step, "final": evals[-1]["eval"] if evals else None,
                     "step0": evals[0]["eval"] if evals and evals[0]["step"] == 0 else None,
                     "best_step": best_step, "best_accuracy": best_acc,
                     "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None)}
        (out / "summary.json").write_text(json.dumps(summary_d, indent=1))
        metrics_file.close()
        print(f"done: adapter in {out}/adapter_model.safetensors, best (step {best_step}) in {out}/best", file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    predict.run_cli(main)
