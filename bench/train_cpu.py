"""Training on CPU: our train.py against transformers + PEFT (bench/peer_cpu.py), same everything.

Same model folder, data, validation sample, prompt, hyper-parameters and batches (the peer draws
them through train.py's own parser, data loader and sampler), for a few seeds. Two phases:

1. speed (interleaved): both models built in this process; the first --speed-steps windows of
   seed 1 (after one warm-up window) are built once, then for each micro-batch every run does its
   forward + backward in turn, the order flipping each time (ours, peer, peer, ours, ...), so that
   machine load hits all runs alike; each run's clip + AdamW closes its window. Reported: median
   step time, tokens/s, and the median over windows of (this run's time / ours). `--variants`
   adds runs: `nockpt` (ours without activation checkpointing), `kernels` (ours with kernels/
   wired in as bench/train_speed.py does it; on CPU that is the PyTorch references, whose gain is
   one dropout mask and one A GEMM for q,k,v and for gate,up), `fullhead` (the peer computing
   logits at every position, then gathering, as a plain transformers loop would), `torchdrop`
   (ours drawing torch's dropout masks, KERNELS=torch, instead of kernels/dropout.py's).
2. learning: per seed, `train.main` (in this process, --eval-every 0 so no evaluation falls inside
   a timed step) and the peer's copy of its loop, in alternating order (seed 1 ours first, seed 2
   peer first, ...). Reported per run: step time (median, first step excluded), tokens/s (real
   tokens, no padding), validation accuracy and ROC-AUC at step 0 and at the end, the load, and
   the largest per-step loss difference between the two sides: the adapters start bit-identical
   and draw the same dropout masks (see peer_cpu.py; ours runs with KERNELS=torch here, which
   on CPU changes only the dropout to torch's own masks), so that checks data, prompt, loss and
   optimizer are the same, up to rounding. The step times of this phase are therefore ours
   without the cheaper dropout; phase 1 times the default.

    python bench/train_cpu.py                                              # the main measurement
    python bench/train_cpu.py --no-learn --speed-steps 8 --threads 1 --clock cpu \
        --variants nockpt,kernels,fullhead --profile 12                    # speed on a busy machine
    python bench/train_cpu.py --seeds 1 --steps 1 --rows 4 --speed-steps 1 \
        --batch-size 1 --max-seq-len 128                                   # smoke test, < 1 min
    python bench/train_cpu.py --seeds 1,2,3 --lr 1e-3                      # any train.py flag

Every flag not listed under `--help` goes to train.py (and so to the peer); MAIN below holds the
main measurement's train.py flags, which later ones override. It uses --grad-accum 1 (4 rows a
step), where the issue's setting is 2: at ~10-15 s per 4-row micro-batch on this 2-core CPU,
accumulation 2 would take ours ~20 min per seed, before the peer's run and the evaluations.

--clock cpu with --threads 1 times steps in this process's CPU time. A 2-thread step on a machine
that other jobs share can take 5-10x its quiet time (an OpenMP thread that loses its core stalls
the other at every barrier), which no interleaving evens out; one thread's CPU time cannot be
inflated by other jobs (beyond cache and memory-bandwidth sharing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
import peer_cpu  # noqa: E402
import train  # noqa: E402

# The main measurement's settings (train.py flags); later flags on the command line win.
MAIN = ["--precision", "fp32", "--device", "cpu", "--r", "32", "--alpha", "64", "--dropout", "0.1",
        "--targets", train.TARGETS, "--lr", "4e-4", "--scheduler", "cosine", "--warmup", "0.03",
        "--batch-size", "4", "--grad-accum", "1", "--max-seq-len", "384", "--steps", "30",
        "--loss", "answer", "--val-rows", "200", "--eval-every", "0", "--save-every", "1000000000"]


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def step_stats(seconds: list[float], tokens: list[int]) -> tuple[float, float]:
    """(median step s, tokens/s) over the steps after the first (all of them if there is one)."""
    s, t = (seconds[1:], tokens[1:]) if len(seconds) > 1 else (seconds, tokens)
    return float(np.median(s)), sum(t) / sum(s)


# ----------------------------------------------------------------------------- phase 1: speed

VARIANTS = {"nockpt": "ours nockpt", "kernels": "ours kernels", "fullhead": "peer fullhead",
            "torchdrop": "ours torch dropout"}


def speed(argv: list[str], n_steps: int, head: str, variants: list[str], profile: int = 0) -> list[dict]:
    """Interleaved timing on the first n_steps windows (after one warm-up window), per micro-batch:
    forward + backward of micro-batch j for every run in turn (the order flips each time), then
    each run's clip + AdamW step. A run's step time is the sum of its parts."""
    args, model_dir, tok, train_ds, _ = peer_cpu.setup(argv)
    wins = list(peer_cpu.windows(args, train_ds, n_steps + 1))  # +1: a warm-up window
    cpu = torch.device("cpu")
    ours = train.build(args, model_dir, cpu, "fp32")[0].train()
    pm = peer_cpu.load_peer(model_dir, args).train()
    names = ["ours", "peer"] + [VARIANTS[v] for v in variants]
    from lora.inject import lora_state_dict
    theirs = dict(pm.named_parameters())  # PEFT's names: ...q_proj.lora_A.default.weight
    init_diff = max((v - theirs["base_model.model." + k.replace(".weight", ".default.weight")]).abs().max().item()
                    for k, v in lora_state_dict(ours).items())

    def kernels_ctx(name):
        if name == "ours torch dropout":
            return kernels.backend("torch")  # on CPU: torch's dropout masks
        if name != "ours kernels":
            return contextlib.nullcontext()
        from train_speed import kernels_in_model  # the GPU bench's wiring of kernels/ (CPU: references)
        return kernels_in_model()

    def micro(name, b, n):
        with kernels_ctx(name):
            if name.startswith("ours"):
                ours.grad_checkpointing = args.grad_checkpointing and name != "ours nockpt"
                loss = train.compute_loss(ours, b, args.loss, cpu)
            else:
                loss = peer_cpu.peer_loss(pm, b, args.loss, "full" if name == "peer fullhead" else head)
            (loss / n).backward()

    params = {"ours": [p for p in ours.parameters() if p.requires_grad],
              "peer": [p for p in pm.parameters() if p.requires_grad]}
    opts = {n: torch.optim.AdamW(params[n.split()[0]], lr=args.lr, weight_decay=args.weight_decay) for n in names}
    grads = {n: None for n in names}  # each run's accumulated gradients (variants share A and B)
    times = {n: [] for n in names}
    flip = False
    for i, w in enumerate(wins):
        n_t = float(sum(int((b["targets"] != -100).sum()) for b in w))
        spent = dict.fromkeys(names, 0.0)
        for j, b in enumerate(w):
            for name in (names[::-1] if flip else names):  # ABBA: load drift hits every run alike
                ps = params[name.split()[0]]
                for p, g in zip(ps, grads[name] or [None] * len(ps)):
                    p.grad = g
                t = peer_cpu.CLOCK()
                micro(name, b, n_t)
                if j == len(w) - 1:
                    peer_cpu.opt_step(ps, opts[name], args.clip)
                spent[name] += peer_cpu.CLOCK() - t
                grads[name] = [p.grad for p in ps]
            flip = not flip
        for name in names:
            if i > 0:
                times[name].append(spent[name])
            print(f"speed window {i} {name}: {spent[name]:.2f} s (load {load()})", file=sys.stderr, flush=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        b, n_t = wins[0][0], float(int((wins[0][0]["targets"] != -100).sum()))
        for name in names:
            with prof(activities=[ProfilerActivity.CPU]) as pr:
                micro(name, b, n_t)
            for p in params[name.split()[0]]:
                p.grad = None
            print(f"\nprofile, one micro-batch {tuple(b['input_ids'].shape)}, {name}:")
            print(pr.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile))
    toks = [sum(int(b["attention_mask"].sum()) for b in w) for w in wins[1:]]
    rows = []
    for n in names:
        ratio = float(np.median([x / o for o, x in zip(times["ours"], times[n])]))  # this / ours, per window
        rows.append(dict(run=n, step_s=float(np.median(times[n])), tokens_per_s=sum(toks) / sum(times[n]),
                         time_vs_ours=ratio, windows=len(times[n]), init_diff=init_diff))
    return rows


# ----------------------------------------------------------------------------- phase 2: learning

class _Clock:
    """Stands in for the `time` module inside train.py, so its per-step tokens/s uses CLOCK."""

    def __getattr__(self, name):
        return peer_cpu.CLOCK if name == "perf_counter" else getattr(time, name)


def ours_run(argv: list[str], out: Path, tokens: list[int]) -> dict:
    t = time.perf_counter()
    saved, train.time = train.time, _Clock()
    try:
        with kernels.backend("torch"):  # on CPU only the dropout changes: PEFT's masks, so the two runs can be compared step by step
            rc = train.main(argv + ["--out", str(out)])
    finally:
        train.time = saved
    if rc:
        raise RuntimeError(f"train.py exited with {rc}")
    wall = time.perf_counter() - t
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval" in r]
    secs = [n / r["tokens_per_s"] for n, r in zip(tokens, steps)]  # train.py logs tokens/s per step
    return dict(steps=[dict(loss=r["loss"], seconds=s, tokens=n) for r, s, n in zip(steps, secs, tokens)],
                eval0=evals[0]["eval"], final=evals[-1]["eval"], wall_s=wall)


def peer_run(argv: list[str], head: str) -> dict:
    t = time.perf_counter()
    r = peer_cpu.train_peer(argv, head, log=lambda s: print(s, file=sys.stderr, flush=True))
    r["wall_s"] = time.perf_counter() - t
    return r


def summarise(side: str, seed: int, r: dict, load_before: str) -> dict:
    med, tps = step_stats([s["seconds"] for s in r["steps"]], [s["tokens"] for s in r["steps"]])
    return dict(side=side, seed=seed, step_s=med, tokens_per_s=tps, acc0=r["eval0"]["accuracy"],
                auc0=r["eval0"]["auc"], acc=r["final"]["accuracy"], auc=r["final"]["auc"],
                loss1=r["steps"][0]["loss"], loss_end=r["steps"][-1]["loss"], wall_s=r["wall_s"],
                losses=[s["loss"] for s in r["steps"]],
                load=f"{load_before} -> {load()}")


def learn(argv: list[str], seeds: list[int], head: str, work: Path) -> list[dict]:
    rows = []
    for k, seed in enumerate(seeds):
        a = argv + ["--seed", str(seed)]
        args, _, _, train_ds, _ = peer_cpu.setup(a)
        tokens = [sum(int(b["attention_mask"].sum()) for b in w) for w in peer_cpu.windows(args, train_ds)]
        sides = ["ours", "peer"] if k % 2 == 0 else ["peer", "ours"]
        for side in sides:
            before = load()
            print(f"== seed {seed}: {side} (load {before})", file=sys.stderr, flush=True)
            r = ours_run(a, work / f"ours-seed{seed}", tokens) if side == "ours" else peer_run(a, head)
            if side == "peer" and [s["tokens"] for s in r["steps"]] != tokens:
                raise RuntimeError("the peer's batches differ from train.py's: the comparison is void")
            rows.append(summarise(side, seed, r, before))
    return rows


# ----------------------------------------------------------------------------- report

def table(speed_rows: list[dict], learn_rows: list[dict]) -> str:
    out = []
    if speed_rows:
        out += ["Speed, interleaved on the same windows:", "",
                "| run | step s (median) | tokens/s | step time / ours | tokens/s ours / this |",
                "| --- | --- | --- | --- | --- |"]
        for r in speed_rows:
            out.append(f"| {r['run']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['time_vs_ours']:.3f} "
                       f"| {speed_rows[0]['tokens_per_s'] / r['tokens_per_s']:.3f} |")
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Other flags go to train.py. Main-measurement defaults: " + " ".join(MAIN))
    p.add_argument("--seeds", default="1,2,3", help="comma-separated train.py --seed values for the learning runs")
    p.add_argument("--rows", type=int, help="validation rows (train.py --val-rows)")
    p.add_argument("--speed-steps", type=int, default=4, help="interleaved timed windows per side (0: skip phase 1)")
    p.add_argument("--variants", default="", help="extra speed rows, comma-separated: nockpt (ours without activation "
                   "checkpointing), kernels (ours with kernels/ wired in as bench/train_speed.py does; on CPU the "
                   "PyTorch references: shared dropout masks for q,k,v and gate,up), fullhead (the peer's head at "
                   "every position), torchdrop (ours with torch's dropout masks, KERNELS=torch)")
    p.add_argument("--profile", type=int, default=0, help="after phase 1, print the top N ops of one micro-batch per run")
    p.add_argument("--no-learn", action="store_true", help="phase 1 only")
    p.add_argument("--peer-head", choices=["gather", "full"], default="gather",
                   help="peer's answer loss: head at the cue only (same work as ours) or at every position")
    p.add_argument("--work", help="folder for our runs' outputs (default: a temporary folder)")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's, = cores); on a "
                   "shared machine 1 keeps timings steadier (a descheduled OpenMP thread stalls the other)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="step times in wall time, or in this process's CPU time (use with --threads 1 on a "
                        "shared machine: then other jobs cannot inflate it)")
    mine, rest = p.parse_known_args(argv)
    if mine.threads:
        torch.set_num_threads(mine.threads)
    if mine.clock == "cpu":
        peer_cpu.CLOCK = time.process_time
    argv_t = MAIN + rest + (["--val-rows", str(mine.rows)] if mine.rows else [])
    seeds = [int(s) for s in mine.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in mine.variants.split(",") if v.strip()]
    print(f"train.py flags: {' '.join(argv_t)}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {load()}", file=sys.stderr, flush=True)

    speed_rows = speed(argv_t + ["--seed", str(seeds[0])], mine.speed_steps, mine.peer_head, variants,
                       mine.profile) \
        if mine.speed_steps > 0 else []
    learn_rows = []
    if not mine.no_learn:
        with tempfile.TemporaryDirectory(prefix="train_cpu-") as tmp:
            learn_rows = learn(argv_t, seeds, mine.peer_head, Path(mine.work or tmp))
    if mine.json:
        Path(mine.json).write_text(json.dumps({"flags": argv_t, "speed": speed_rows, "learn": learn_rows}, indent=1))
    import transformers
    import peft
    print(f"\ntrain.py flags: {' '.join(argv_t)}\ntorch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, {torch.get_num_threads()} threads, clock {mine.clock}, peer head: {mine.peer_head}\n")
    print(table(speed_rows, learn_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
