"""What the bench scripts share, written once: clocks and timing, argument helpers, train.py's
flags as an engine.config.TrainConfig, the random Llama-3-shaped model and the kernels
self-check of the GPU benchmarks, and the HF + PEFT peer script (find, run, read, join).

Every script runs from the repository root as a module (`python -m bench.NAME`), so the library
imports as it does for train.py and predict.py; nothing here edits sys.path or patches the
library. The kernels are picked the way users pick them: `kernels.backend(name)` around a run,
or the KERNELS environment variable.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import kernels
from engine.config import TrainConfig, flag, parse_train_args
from model.config import LlamaConfig
from model.llama import PROJECTIONS, Llama
from model.precision import compute_dtype

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- clocks and timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, *args, **kw):
    """(fn's result, wall seconds, CPU seconds of this process, all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0, time.process_time() - c0


def median_time(fn, warmup: int, reps: int, device: torch.device):
    """(fn's last result, median wall seconds of `reps` calls after `warmup` untimed ones), each
    call between two synchronisations."""
    times, out = [], None
    for i in range(warmup + reps):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def load() -> str:
    """The 1, 5 and 15-minute load averages, as 1.2/0.8/0.5."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def step_stats(seconds: list[float], tokens: list[int]) -> tuple[float, float]:
    """(median step s, tokens/s) over the steps after the first (all of them if there is one)."""
    s, t = (seconds[1:], tokens[1:]) if len(seconds) > 1 else (seconds, tokens)
    return float(np.median(s)), sum(t) / sum(s)


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def add_clock_args(p: argparse.ArgumentParser) -> None:
    """--threads and --clock, for the CPU benchmarks."""
    p.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's, = cores); on a "
                   "shared machine 1 keeps timings steadier (a descheduled OpenMP thread stalls the other)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time in wall time, or in this process's CPU time (with --threads 1 on a shared "
                        "machine: then other jobs cannot inflate it)")


def clock_of(args):
    """Apply --threads; return the clock --clock names (time.perf_counter or time.process_time)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return time.process_time if args.clock == "cpu" else time.perf_counter


# ----------------------------------------------------------------------------- train.py's flags

def train_config(argv: list[str]) -> TrainConfig:
    """A TrainConfig from train.py flags, exactly as train.py builds it (engine/config.py)."""
    return parse_train_args(argv)


def model_dir_of(cfg: TrainConfig) -> Path:
    """cfg.model, else the embedded default model (converted once into cfg.cache_dir)."""
    from model.default import default_model_dir
    return Path(cfg.model) if cfg.model else default_model_dir(cfg.cache_dir)


# ----------------------------------------------------------------------------- the random model (GPU benches)

# The peer's shapes (peer_hf_peft.py llama_config), so both sides build the same model.
SIZES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
MODES = ("int8", "nf4", "bf16")


def bench_config(size: str) -> LlamaConfig:
    return LlamaConfig(**SIZES[size], rms_norm_eps=1e-5, max_position_embeddings=8192,
                       tie_word_embeddings=False, rope_scaling=None)


def n_params(cfg: LlamaConfig) -> int:
    """Logical parameter count (a quantized weight counts its out x in elements): 8.03 B for 8b."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * cfg.num_attention_heads * hd * 2 + d * cfg.num_key_value_heads * hd * 2
    block = attn + 3 * d * f + 2 * d
    return cfg.num_hidden_layers * block + d + cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)


def build_random_model(cfg: LlamaConfig, mode: str, device: torch.device, seed: int = 0,
                       dtype: torch.dtype | None = None) -> Llama:
    """Llama with N(0, 0.02) weights (HF's initializer_range) drawn on `device`, each block
    projection stored at `mode` (int8 | nf4 | bf16: the compute dtype) by
    model.quant.quantize_linear as soon as it is drawn, so host memory stays small. Everything
    else in `dtype` (default: model.precision's compute dtype, bf16 on CUDA, fp32 on CPU, as the
    peer). Frozen, eval mode."""
    from model.quant import quantize_linear
    dtype = dtype or compute_dtype("int8", device)
    precision = mode if mode in ("int8", "nf4") else {torch.bfloat16: "bf16", torch.float16: "fp16",
                                                      torch.float32: "fp32"}[dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen).mul_(0.02)

    with torch.device("meta"):
        model = Llama(cfg)
    for block in model.model.layers:
        for path in PROJECTIONS:  # self_attn.q_proj, ..., mlp.down_proj
            parent, name = block.get_submodule(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]
            old = getattr(parent, name)
            w = rand(old.out_features, old.in_features)
            setattr(parent, name, quantize_linear(w, precision))
            del w
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight = nn.Parameter(torch.ones(cfg.hidden_size, device=device, dtype=dtype))
    model.model.norm.weight = nn.Parameter(torch.ones(cfg.hidden_size, device=device, dtype=dtype))
    model.model.embed_tokens.weight = nn.Parameter(rand(cfg.vocab_size, cfg.hidden_size))
    if model.lm_head is not None:
        model.lm_head.weight = nn.Parameter(rand(cfg.vocab_size, cfg.hidden_size))
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise RuntimeError(f"build_random_model: {left[0]} is still on the meta device")
    model.requires_grad_(False)
    return model.eval()


def check_kernels(device: torch.device, backend: str) -> float:
    """Largest relative difference (max |a - b| / max |b|) in the logits and in each LoRA gradient
    of a tiny fp32 int8 model run under kernels.backend(backend) against kernels.backend("torch")
    (the PyTorch definitions in model/llama.py and model/quant.py). Training mode, gradient
    checkpointing, left padding, LoRA dropout 0 (on the CPU the backend also picks the dropout
    masks). Raises if above 1e-4. On CPU tensors under "auto" both runs take the same path: 0."""
    from lora.inject import apply_lora
    cfg = bench_config("tiny")
    model = build_random_model(cfg, "int8", device, seed=1, dtype=torch.float32)  # the int8 dequantize too
    torch.manual_seed(0)
    apply_lora(model, r=8, alpha=16, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)  # B = 0 would hide the adapters
    model.grad_checkpointing = True
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, cfg.vocab_size, (2, 37), device=device)
    mask = torch.ones(2, 37, dtype=torch.bool, device=device)
    mask[1, :5] = False  # left padding: the explicit-mask SDPA path too

    def run(name):
        with kernels.backend(name):
            logits = model(ids, mask)
            return [logits.detach()] + list(torch.autograd.grad(logits.square().mean(), lora))

    want, got = run("torch"), run(backend)
    diff = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(got, want))
    if not diff <= 1e-4:
        raise RuntimeError(f"KERNELS={backend} changes the tiny model's logits or LoRA grads by {diff:.3e} "
                           f"(relative) against KERNELS=torch")
    return diff


def add_gpu_args(p: argparse.ArgumentParser, modes: str) -> None:
    """The flags train_speed.py and score_speed.py share: what to run, the peer, the output."""
    cuda = torch.cuda.is_available()
    p.add_argument("--size", choices=sorted(SIZES), default="8b" if cuda else "tiny",
                   help="model shape (the peer's: 8b = Llama-3-8B; default 8b on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu")
    p.add_argument("--modes", default=modes, help="comma-separated bases: int8, nf4, bf16")
    p.add_argument("--kernels", choices=kernels.BACKENDS, default=None,
                   help="the kernels switch for our runs (kernels.backend): auto = Triton on CUDA tensors, "
                        "triton = always (CPU: with TRITON_INTERPRET=1), torch = the PyTorch definitions "
                        "(default: $KERNELS, else auto)")
    p.add_argument("--baseline-modes", default="",
                   help="also run these bases with KERNELS=torch, to show what the Triton kernels buy")
    p.add_argument("--peer", default="run",
                   help="run (the peer script as a subprocess), skip, or a peer .jsonl (e.g. an earlier "
                        "<out>/peer.jsonl)")
    p.add_argument("--peer-script", help="peer_hf_peft.py (default: .peer/, shared/bench/ or ../shared/bench/)")
    p.add_argument("--peer-path", default="/tmp/rand-llama", help="where the peer saves its random model")
    p.add_argument("--peer-timeout", type=int, default=420, help="seconds before the peer is abandoned")
    p.add_argument("--out", help="folder for the result JSON (and peer.jsonl when the peer runs here)")


def finish_gpu_args(args: argparse.Namespace) -> argparse.Namespace:
    """Split the comma lists, check the bases, resolve --kernels from $KERNELS."""
    args.modes = [m for m in args.modes.split(",") if m]
    args.baseline_modes = [m for m in args.baseline_modes.split(",") if m]
    for m in args.modes + args.baseline_modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown base {m!r} ({', '.join(MODES)})")
    args.kernels = args.kernels or kernels.get_backend()
    return args


def gpu_setup(args, name: str):
    """(device, output folder or None, LlamaConfig, card name) for a GPU benchmark; prints the
    header line and runs check_kernels when the run uses more than the PyTorch definitions."""
    device = torch.device(args.device)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(args.size)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"{name}: {args.size} ({n_params(cfg) / 1e6:,.1f} M params) on {gpu}, torch {torch.__version__}, "
          f"KERNELS={args.kernels} (triton {'yes' if kernels.have_triton() else 'no'})", flush=True)
    if args.kernels != "torch":
        print(f"kernels self-check (tiny fp32 int8, logits + LoRA grads, KERNELS={args.kernels} vs torch): "
              f"max relative diff {check_kernels(device, args.kernels):.2e}", flush=True)
    return device, out_dir, cfg, gpu


# ----------------------------------------------------------------------------- the GPU peer

PEER_CANDIDATES = (REPO / ".peer" / "peer_hf_peft.py", REPO / "shared" / "bench" / "peer_hf_peft.py",
                   REPO.parent / "shared" / "bench" / "peer_hf_peft.py")


def run_peer(script: Path, flags: dict, modes: list[str], timeout: int, out_dir: Path | None) -> list[dict]:
    """Run peer_hf_peft.py once (train AND score rows for every mode) with `flags` (its own:
    size, device, batch, seq, steps, warmup, score_batch, path) and parse its JSON lines. The raw
    rows are saved as <out>/peer.jsonl, which the other benchmark can reuse (--peer FILE)."""
    cmd = [sys.executable, str(script), "--modes", ",".join(modes)]
    for k, v in flags.items():
        cmd += [flag(k), str(v)]
    print("peer:", " ".join(cmd), flush=True)
    env = dict(os.environ, OUT="")  # the peer appends to $OUT/anchor.jsonl when set: we save our own copy
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr, rc = f"timed out after {timeout} s", "timeout"
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    print(f"peer: exit {rc}, {len(rows)} rows, {time.perf_counter() - t:.0f} s", flush=True)
    if rc != 0 or not rows:
        print("peer stderr (tail):\n" + stderr[-2000:], flush=True)
    if out_dir is not None:
        with open(out_dir / "peer.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if stderr:
            (out_dir / "peer_stderr.txt").write_text(stderr[-200_000:])
    return rows


def peer_rows(args, flags: dict, out_dir: Path | None) -> list[dict]:
    """--peer skip | run | a .jsonl file from an earlier peer run. `flags`: see run_peer."""
    if args.peer == "skip":
        return []
    if args.peer != "run":
        path = Path(args.peer)
        if not path.is_file():
            raise SystemExit(f"--peer {args.peer}: no such file (use run, skip or a peer .jsonl)")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    script = Path(args.peer_script) if args.peer_script else next((p for p in PEER_CANDIDATES if p.is_file()), None)
    if script is None or not script.is_file():
        print(f"peer: no peer_hf_peft.py (looked in {', '.join(map(str, PEER_CANDIDATES))}); skipped")
        return []
    flags = dict(size=args.size, device=args.device, **flags, path=args.peer_path)
    return run_peer(script, flags, sorted(set(args.modes + args.baseline_modes)), args.peer_timeout, out_dir)


def measure_modes(args, measure, peer: list[dict], kind: str, rate: str, device, out: Path | None,
                  meta: dict) -> list[dict]:
    """measure(mode) for every --modes base under KERNELS=--kernels, then every --baseline-modes
    base under KERNELS=torch; each row joined with the peer's `kind` row of that mode (its `rate`
    and peak GiB, and ratio = ours / peer `rate`), printed, and written at once with `meta` to the
    JSON file `out` (a stage time limit must not lose the finished ones). One failing base does
    not stop the others."""
    results = []
    for mode, backend in [(m, args.kernels) for m in args.modes] + [(m, "torch") for m in args.baseline_modes]:
        try:
            with kernels.backend(backend):
                r = dict(measure(mode), kernels=backend)
        except Exception as e:  # noqa: BLE001 -- one failing base must not hide the others
            r = dict(mode=mode, kernels=backend, error=repr(e)[:500])
            free(device)
        pr = next((p for p in peer if p.get("kind") == kind and p.get("mode") == mode), None)
        if pr and (pr.get("batch"), pr.get("seq")) != (args.batch, args.seq):  # another work unit
            print(f"peer {kind} {mode}: batch x seq {pr.get('batch')} x {pr.get('seq')} is not ours; no ratio")
            pr = None
        r["peer_" + rate] = pr.get(rate) if pr else None
        r["peer_peak_gib"] = pr.get("peak_gib") if pr else None
        r["ratio"] = round(r[rate] / r["peer_" + rate], 3) if r.get(rate) and r["peer_" + rate] else None
        results.append(r)
        print(json.dumps(r), flush=True)
        if out is not None:
            out.write_text(json.dumps(dict(meta, results=results), indent=1, default=str))
    return results


def print_table(title: str, cols: list, results: list[dict], peer: list[dict], kind: str) -> None:
    """`title`, a header, then per result its base, kernels and `cols`: (header, key, width, format
    spec) each, "|" between ours and the peer's; an error as one line. Last the peer's errors of
    `kind`."""
    def line(cells):
        return " ".join("|" if c == "|" else cells(c) for c in cols)

    print(title)
    print(f"{'base':<6} {'kernels':<8} " + line(lambda c: f"{c[0]:>{c[2]}}"))
    for r in results:
        print(f"{r['mode']:<6} {r['kernels']:<8} "
              + (f"ERROR {r['error'][:100]}" if "error" in r else line(lambda c: f"{fmt(r[c[1]], c[3]):>{c[2]}}")))
    for r in peer:
        if r.get("kind") == kind and "error" in r:
            print(f"peer {r['mode']}: ERROR {r['error'][:200]}")
