"""Training on CPU: our training step and train.py against transformers + PEFT (bench/peer_cpu.py).

Same model folder, data, validation sample, prompt, hyper-parameters and batches (the peer draws
them through the library's own TrainConfig, data loader and sampler, from train.py's flags), for
a few seeds. Two phases:

1. speed (interleaved, in this process): ours is built and stepped through the library with the
   calls train.py's loop makes -- engine.setup.build_for_training and engine.optim.make_optimizer,
   then per micro-batch engine.loss.compute_loss / n_targets and its backward, and clip + AdamW
   to close the window -- next to the peer
   model. The first --speed-steps windows of the first seed (after one warm-up window) are built
   once, then for each micro-batch every run does its forward + backward in turn, the order
   flipping each time (ours, peer, peer, ours, ...), so that machine load hits all runs alike;
   each run's clip + AdamW closes its window. Reported: median step time, tokens/s, and the
   median over windows of (this run's time / ours). "ours" is train.py's default configuration
   (an int8 base; activation checkpointing as `--grad-checkpointing auto` decides), "peer" is
   transformers + PEFT on the fp32 model with gradient checkpointing, as the QLoRA recipe runs
   it. `--variants` adds runs: `nockpt` / `ckpt` (ours with checkpointing off / on),
   `peernockpt` (the peer without checkpointing), `fullhead` (the peer computing logits at every position,
   then gathering, as a plain transformers loop would), `torchdrop` (ours under
   lora.lora.dropout_masks("torch"): torch's dropout masks instead of lora/lora.py's
   dropout_bits).
2. learning: per seed, `python train.py` itself, run as a subprocess from the repository root
   with DROPOUT_MASKS=torch in its environment (--eval-every 0, so no evaluation falls inside a timed
   step), and the peer's copy of its loop in this process, in alternating order (seed 1 ours
   first, seed 2 peer first, ...). Ours is read back from the run's metrics.jsonl: the loss and
   tokens_per_s train.py logs for each step (its own wall clock, from the end of one step to the
   end of the next, batch building included, as the peer's) and the step-0 and final
   evaluations. So the learning figures are train.py's, end to end, with nothing re-implemented
   or patched. Reported per run: step time (median, first step excluded), tokens/s (real
   tokens, no padding), validation accuracy and ROC-AUC at step 0 and at the end, the load, and
   the largest per-step loss difference between the two sides: the adapters start bit-identical
   and draw the same dropout masks (see peer_cpu.py; DROPOUT_MASKS=torch on our side), so that checks
   data, prompt, loss and optimizer are the same, up to rounding. The step times of this phase
   are therefore ours without the cheaper dropout; phase 1 times the default.

Run from the repository root:

    python -m bench.train_cpu                                              # the main measurement
    python -m bench.train_cpu --no-learn --speed-steps 5 --variants nockpt,torchdrop \
        --grad-accum 1                                                     # the README's speed table
    python -m bench.train_cpu --no-learn --speed-steps 8 --threads 1 --clock cpu \
        --variants nockpt,torchdrop,fullhead --profile 12                  # speed on a busy machine
    python -m bench.train_cpu --seeds 1 --steps 1 --rows 4 --speed-steps 1 \
        --batch-size 1 --max-seq-len 128                                   # smoke test, ~1 min
    python -m bench.train_cpu --seeds 1,2,3 --lr 1e-3                      # any train.py flag

Every flag not listed under `--help` is a train.py flag (engine.config.TrainConfig's fields) and
goes to both sides; MAIN below holds the main measurement's train.py flags, which later ones
override. It uses --grad-accum 1 (4 rows a step), where the issue's setting is 2: at ~10-15 s per
4-row micro-batch on this 2-core CPU, accumulation 2 would take ours ~20 min per seed, before the
peer's run and the evaluations.

--clock cpu with --threads 1 times phase 1 in this process's CPU time. A 2-thread step on a
machine that other jobs share can take 5-10x its quiet time (an OpenMP thread that loses its core
stalls the other at every barrier), which no interleaving evens out; one thread's CPU time cannot
be inflated by other jobs (beyond cache and memory-bandwidth sharing). Phase 2 times both sides
in wall time (train.py's own clock); --threads reaches train.py as OMP_NUM_THREADS.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench import peer_cpu
from bench.common import REPO, add_clock_args, clock_of, load, step_stats
from data.batches import row_tokens
from engine.loss import compute_loss, count_targets
from engine.memory import decide_grad_checkpointing
from engine.optim import make_optimizer
from engine.setup import build_for_training
from lora.inject import ALL_PROJECTIONS, lora_state_dict
from lora.lora import dropout_masks
from model.precision import choose_activations

# The main measurement's settings (train.py flags); later flags on the command line win.
MAIN = ["--device", "cpu", "--r", "32", "--alpha", "64", "--dropout", "0.1",
        "--targets", ",".join(ALL_PROJECTIONS), "--lr", "4e-4", "--scheduler", "cosine", "--warmup", "0.03",
        "--batch-size", "4", "--grad-accum", "1", "--max-seq-len", "384", "--steps", "30",
        "--loss", "answer", "--val-rows", "200", "--eval-every", "0", "--save-every", "1000000000"]


# ----------------------------------------------------------------------------- phase 1: speed

# Extra runs (--variants), each: its name in the table. "ours" is train.py's default (the int8
# base, activations as `auto` picks, shared prefixes, checkpointing as `auto` decides); "peer" is
# transformers + PEFT on the fp32 model with gradient checkpointing, as the QLoRA recipe runs it.
VARIANTS = {"unshared": "ours unshared",  # --share-prefixes off
            "fp32acts": "ours fp32 activations",  # --activations fp32, unshared: train.py's default before
            "nockpt": "ours nockpt", "ckpt": "ours ckpt",  # --grad-checkpointing off / on
            "torchdrop": "ours torch dropout",  # DROPOUT_MASKS=torch (PEFT's masks)
            "peernockpt": "peer nockpt",  # the peer without gradient checkpointing
            "peerbf16": "peer bf16",  # bf16 weights, no checkpointing: the peer's fastest CPU configuration
            "fullhead": "peer fullhead"}  # the peer's head at every position, then gathering


def speed(argv: list[str], n_steps: int, head: str, variants: list[str], clock, profile: int = 0) -> list[dict]:
    """Interleaved timing on the first n_steps windows (after one warm-up window), per micro-batch:
    forward + backward of micro-batch j for every run in turn (the order flips each time), then
    each run's clip + AdamW step. A run's step time is the sum of its parts. Every run sees the
    same rows; ours builds its micro-batches as train.py does (shared prefixes unless off), the
    peer gets whole rows, and the batches are built before the clock starts."""
    cfg, model_dir, _, train_ds, _ = peer_cpu.setup(argv)
    pos = list(peer_cpu.window_positions(cfg, train_ds, n_steps + 1))  # +1: a warm-up window
    whole = [[train_ds.batch(p) for p in w] for w in pos]
    shared = [[train_ds.batch(p, share=cfg.share_prefixes == "on") for p in w] for w in pos]
    cpu = torch.device("cpu")
    names = ["ours", "peer"] + [VARIANTS[v] for v in variants]
    models = {"ours": build_for_training(cfg, model_dir, cpu)[0].train(),
              "peer": peer_cpu.load_peer(model_dir, cfg).train()}
    if "ours fp32 activations" in names:
        models["ours32"] = build_for_training(replace(cfg, activations="fp32"), model_dir, cpu)[0].train()
    if "peer bf16" in names:
        models["peer16"] = peer_cpu.load_peer(model_dir, replace(cfg, grad_checkpointing="off"), torch.bfloat16).train()
    model_of = lambda name: {"ours fp32 activations": "ours32", "peer bf16": "peer16"}.get(name, name.split()[0])
    ours, pm = models["ours"], models["peer"]
    theirs = dict(pm.named_parameters())  # PEFT's names: ...q_proj.lora_A.default.weight
    init_diff = max((v - theirs["base_model.model." + k.replace(".weight", ".default.weight")]).abs().max().item()
                    for k, v in lora_state_dict(ours).items())

    ckpt, why = decide_grad_checkpointing(ours, cfg, cpu)  # "ours" is train.py's default: as decided
    print(f"ours: activations {choose_activations(cfg.precision, cpu, cfg.activations)}, gradient checkpointing "
          f"{'on' if ckpt else 'off'} ({why}); peer: on (the QLoRA recipe)", file=sys.stderr)

    def micro(name, i, j, n_targets):
        m = models[model_of(name)]
        if name.startswith("ours"):
            m.grad_checkpointing = {"ours nockpt": False, "ours ckpt": True}.get(name, ckpt)
            b = whole[i][j] if name in ("ours unshared", "ours fp32 activations") else shared[i][j]
            with dropout_masks("torch") if name == "ours torch dropout" else contextlib.nullcontext():
                (compute_loss(m, b, cfg.loss, cpu) / n_targets).backward()  # as train.py's loop, per micro-batch
        else:
            if name == "peer nockpt":
                pm.base_model.model.gradient_checkpointing_disable()
            loss = peer_cpu.peer_loss(m, whole[i][j], cfg.loss, "full" if name == "peer fullhead" else head)
            (loss / n_targets).backward()
            if name == "peer nockpt":
                peer_cpu.enable_checkpointing(pm.base_model.model)

    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}
    opts = {n: make_optimizer(cfg, params[model_of(n)]) for n in names}  # train.py's optimizer, every run
    grads = {n: None for n in names}  # each run's accumulated gradients (runs on one model share A and B)
    times = {n: [] for n in names}
    flip = False
    for i, w in enumerate(whole):
        n_t = torch.tensor(float(count_targets(w)))
        spent = dict.fromkeys(names, 0.0)
        for j in range(len(w)):
            for name in (names[::-1] if flip else names):  # ABBA: load drift hits every run alike
                ps = params[model_of(name)]
                for p, g in zip(ps, grads[name] or [None] * len(ps)):
                    p.grad = g
                t = clock()
                micro(name, i, j, n_t)
                if j == len(w) - 1:
                    peer_cpu.opt_step(ps, opts[name], cfg.clip)
                spent[name] += clock() - t
                grads[name] = [p.grad for p in ps]
            flip = not flip
        for name in names:
            if i > 0:
                times[name].append(spent[name])
            print(f"speed window {i} {name}: {spent[name]:.2f} s (load {load()})", file=sys.stderr, flush=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        n_t = torch.tensor(float(count_targets(whole[0][:1])))
        for name in names:
            with prof(activities=[ProfilerActivity.CPU]) as pr:
                micro(name, 0, 0, n_t)
            for p in params[model_of(name)]:
                p.grad = None
            print(f"\nprofile, one micro-batch {tuple(whole[0][0]['input_ids'].shape)}, {name}:")
            print(pr.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile))
    toks = [sum(row_tokens(b) for b in w) for w in whole[1:]]  # the rows' own tokens: the same for every run
    computed = {True: sum(int(b["attention_mask"].sum()) for w in shared[1:] for b in w), False: sum(toks)}
    rows = []
    for n in names:
        ratio = float(np.median([x / o for o, x in zip(times["ours"], times[n])]))  # this / ours, per window
        rows.append(dict(run=n, step_s=float(np.median(times[n])), tokens_per_s=sum(toks) / sum(times[n]),
                         computed=computed[n.startswith("ours") and n not in ("ours unshared", "ours fp32 activations")],
                         time_vs_ours=ratio, windows=len(times[n]), init_diff=init_diff))
    return rows


# ----------------------------------------------------------------------------- phase 2: learning

def ours_run(argv: list[str], out: Path, tokens: list[int], threads: int | None) -> dict:
    """`python train.py ARGV --out OUT` (DROPOUT_MASKS=torch), then its metrics.jsonl: per-step loss and
    seconds (the step's real tokens / the tokens_per_s train.py logged), step-0 and final metrics."""
    env = dict(os.environ, DROPOUT_MASKS="torch")  # PEFT's masks, step by step
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "train.py", *argv, "--out", str(out), "--overwrite"]
    t = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=sys.stderr).returncode  # our stdout: the table only
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}")
    wall = time.perf_counter() - t
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval" in r]
    if len(steps) != len(tokens):
        raise RuntimeError(f"train.py logged {len(steps)} steps, the batches reproduced here are {len(tokens)}")
    secs = [n / r["tokens_per_s"] for n, r in zip(tokens, steps)]
    return dict(steps=[dict(loss=r["loss"], seconds=s, tokens=n) for r, s, n in zip(steps, secs, tokens)],
                eval0=evals[0]["eval"], final=evals[-1]["eval"], wall_s=wall)


def peer_run(argv: list[str], head: str) -> dict:
    t = time.perf_counter()
    r = peer_cpu.train_peer(argv, head, log=lambda s: print(s, file=sys.stderr, flush=True))  # wall clock, as train.py
    r["wall_s"] = time.perf_counter() - t
    return r


def summarise(side: str, seed: int, r: dict, load_before: str) -> dict:
    med, tps = step_stats([s["seconds"] for s in r["steps"]], [s["tokens"] for s in r["steps"]])
    return dict(side=side, seed=seed, step_s=med, tokens_per_s=tps, acc0=r["eval0"]["accuracy"],
                auc0=r["eval0"]["auc"], acc=r["final"]["accuracy"], auc=r["final"]["auc"],
                loss1=r["steps"][0]["loss"], loss_end=r["steps"][-1]["loss"], wall_s=r["wall_s"],
                losses=[s["loss"] for s in r["steps"]],
                load=f"{load_before} -> {load()}")


def learn(argv: list[str], seeds: list[int], head: str, work: Path, threads: int | None) -> list[dict]:
    rows = []
    for k, seed in enumerate(seeds):
        a = argv + ["--seed", str(seed)]
        cfg, _, _, train_ds, _ = peer_cpu.setup(a)
        tokens = [sum(int(b["attention_mask"].sum()) for b in w) for w in peer_cpu.windows(cfg, train_ds)]
        sides = ["ours", "peer"] if k % 2 == 0 else ["peer", "ours"]
        for side in sides:
            before = load()
            print(f"== seed {seed}: {side} (load {before})", file=sys.stderr, flush=True)
            r = ours_run(a, work / f"ours-seed{seed}", tokens, threads) if side == "ours" else peer_run(a, head)
            if side == "peer" and [s["tokens"] for s in r["steps"]] != tokens:
                raise RuntimeError("the peer's batches differ from train.py's: the comparison is void")
            rows.append(summarise(side, seed, r, before))
    return rows


# ----------------------------------------------------------------------------- report

def table(speed_rows: list[dict], learn_rows: list[dict]) -> str:
    out = []
    if speed_rows:
        out += ["Speed, interleaved on the same windows (tokens/s: the rows' own tokens per second; tokens "
                "computed: what the model processed, a shared prefix once):", "",
                "| run | step s (median) | tokens/s | tokens computed | step time / ours | ours / this (tokens/s) |",
                "| --- | --- | --- | --- | --- | --- |"]
        for r in speed_rows:
            out.append(f"| {r['run']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['computed']:,} "
                       f"| {r['time_vs_ours']:.3f} | **{speed_rows[0]['tokens_per_s'] / r['tokens_per_s']:.2f}x** |")
        out += ["", f"{speed_rows[0]['windows']} timed windows. Adapters at init, max |ours - peer| = "
                    f"{speed_rows[0]['init_diff']:.1e} (same seed, same RNG draws: see peer_cpu.py).", ""]
    if learn_rows:
        out += ["Learning runs (step time: median excluding step 1; tokens/s: real tokens, steps 2..N):", "",
                "| side | seed | step s | tokens/s | acc 0 | auc 0 | acc end | auc end | loss step 1 | loss end "
                "| wall s | load 1/5/15 min |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(learn_rows, key=lambda r: (r["side"], r["seed"])):
            out.append(f"| {r['side']} | {r['seed']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['acc0']:.4f} "
                       f"| {r['auc0']:.4f} | {r['acc']:.4f} | {r['auc']:.4f} | {r['loss1']:.5f} | {r['loss_end']:.4f} "
                       f"| {r['wall_s']:.0f} | {r['load']} |")
        mean = {}
        for side in ("ours", "peer"):
            rs = [r for r in learn_rows if r["side"] == side]
            mean[side] = {k: float(np.mean([r[k] for r in rs])) for k in
                          ("step_s", "tokens_per_s", "acc0", "auc0", "acc", "auc", "loss_end")}
            sd = {k: float(np.std([r[k] for r in rs])) for k in ("acc", "auc")}
            m = mean[side]
            out.append(f"| **{side} mean** | {len(rs)} seeds | {m['step_s']:.2f} | {m['tokens_per_s']:.0f} "
                       f"| {m['acc0']:.4f} | {m['auc0']:.4f} | {m['acc']:.4f} ± {sd['acc']:.4f} "
                       f"| {m['auc']:.4f} ± {sd['auc']:.4f} | | {m['loss_end']:.4f} | | |")
        o, p = mean["ours"], mean["peer"]
        out.append(f"| **ours / peer** | | {o['step_s'] / p['step_s']:.3f} | {o['tokens_per_s'] / p['tokens_per_s']:.3f} "
                   f"| | | {o['acc'] - p['acc']:+.4f} (diff) | {o['auc'] - p['auc']:+.4f} (diff) | | | | |")
        pairs = {}
        for r in learn_rows:
            pairs.setdefault(r["seed"], {})[r["side"]] = r
        both = [v for v in pairs.values() if len(v) == 2]
        d1 = max(abs(v["ours"]["loss1"] - v["peer"]["loss1"]) for v in both)
        dn = max(max(abs(a - b) for a, b in zip(v["ours"]["losses"], v["peer"]["losses"])) for v in both)
        out += ["", f"Loss, |ours - peer| (same init, same dropout masks: only rounding differs): step 1 "
                    f"(B = 0) {d1:.2e}, largest over all steps and seeds {dn:.2e}"]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_cpu", description=__doc__.split("\n")[0],
                                epilog="Other flags go to train.py. Main-measurement defaults: " + " ".join(MAIN))
    p.add_argument("--seeds", default="1,2,3", help="comma-separated train.py --seed values for the learning runs")
    p.add_argument("--rows", type=int, help="validation rows (train.py --val-rows)")
    p.add_argument("--speed-steps", type=int, default=4, help="interleaved timed windows per side (0: skip phase 1)")
    p.add_argument("--variants", default="", help="extra speed rows, comma-separated: nockpt (ours without activation "
                   "checkpointing), fullhead (the peer's head at every position), torchdrop (ours with torch's "
                   "dropout masks, DROPOUT_MASKS=torch)")
    p.add_argument("--profile", type=int, default=0, help="after phase 1, print the top N ops of one micro-batch per run")
    p.add_argument("--no-learn", action="store_true", help="phase 1 only")
    p.add_argument("--peer-head", choices=["gather", "full"], default="gather",
                   help="peer's answer loss: head at the cue only (same work as ours) or at every position")
    p.add_argument("--work", help="folder for our runs' outputs (default: a temporary folder)")
    p.add_argument("--json", help="also write the rows as JSON here")
    add_clock_args(p)
    mine, rest = p.parse_known_args(argv)
    clock = clock_of(mine)
    argv_t = MAIN + rest + (["--val-rows", str(mine.rows)] if mine.rows else [])
    seeds = [int(s) for s in mine.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in mine.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    print(f"train.py flags: {' '.join(argv_t)}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {load()}", file=sys.stderr, flush=True)

    speed_rows = speed(argv_t + ["--seed", str(seeds[0])], mine.speed_steps, mine.peer_head, variants, clock,
                       mine.profile) if mine.speed_steps > 0 else []
    learn_rows = []
    if not mine.no_learn:
        with tempfile.TemporaryDirectory(prefix="train_cpu-") as tmp:
            learn_rows = learn(argv_t, seeds, mine.peer_head, Path(mine.work or tmp), mine.threads)
    if mine.json:
        Path(mine.json).write_text(json.dumps({"flags": argv_t, "speed": speed_rows, "learn": learn_rows}, indent=1))
    import peft
    import transformers
    print(f"\ntrain.py flags: {' '.join(argv_t)}\ntorch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, {torch.get_num_threads()} threads, clock {mine.clock} (phase 1; phase 2: wall), "
          f"peer head: {mine.peer_head}\n")
    print(table(speed_rows, learn_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
