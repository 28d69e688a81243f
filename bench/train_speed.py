"""Training throughput on a Llama-3-8B-shaped model with random weights, against the HF + PEFT peer.

The work unit is the peer's (../shared/bench/README.md): one optimizer step of LoRA SFT, r=32,
alpha=64, dropout 0.1 on q,k,v,o,gate,up,down, batch 4 x 512 tokens, full causal-LM loss,
gradient checkpointing, AdamW. The model is built straight on the GPU one weight at a time
(each projection quantized the moment it is drawn), so host memory stays small. Random weights
cost the same time as real ones.

    python bench/train_speed.py                               # on a GPU: 8b, int8/nf4/bf16, + peer
    python bench/train_speed.py --find-max-batch              # largest batch x length in 14 GiB (int8)
    python bench/train_speed.py --size tiny --device cpu --steps 2 --warmup 1   # smoke test

Step time is the median over --steps steps after --warmup steps (synchronised); peak memory is
torch.cuda.max_memory_allocated over those steps (weights included). MFU uses the usual
6 x params x tokens/s over --peak-tflops (it ignores the recompute and the missing weight
gradients, as everyone's MFU does).

`--kernels auto` (default) runs the model with kernels/: the fused int8 dequantize (through
model.quant's dequantize_int8 hook), the Triton RMSNorm, RoPE and SwiGLU, the shared-input LoRA
groups (q,k,v and gate,up; one dropout mask per input) and the chunked cross-entropy, patched
into model/llama.py's classes for the duration of a run (`kernels_in_model`) until llama.py calls
them itself. `--kernels torch` is the unpatched model with a plain cross-entropy.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
from model import llama as llama_mod  # noqa: E402
from model import quant  # noqa: E402
from model.config import LlamaConfig  # noqa: E402
from model.llama import Llama  # noqa: E402

# The peer's shapes (peer_hf_peft.py llama_config), so both sides build the same model.
SIZES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
PEER_CANDIDATES = (REPO / ".peer" / "peer_hf_peft.py", REPO / "shared" / "bench" / "peer_hf_peft.py",
                   REPO.parent / "shared" / "bench" / "peer_hf_peft.py")


# ----------------------------------------------------------------------------- model

def bench_config(size: str) -> LlamaConfig:
    return LlamaConfig(**SIZES[size], rms_norm_eps=1e-5, max_position_embeddings=8192,
                       tie_word_embeddings=False, rope_scaling=None)


def n_params(cfg: LlamaConfig) -> int:
    """Logical parameter count (a quantized weight counts its out x in elements): 8.03 B for 8b."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * cfg.num_attention_heads * hd * 2 + d * cfg.num_key_value_heads * hd * 2
    block = attn + 3 * d * f + 2 * d
    return cfg.num_hidden_layers * block + d + cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: fp32, as the peer


def build_random_model(cfg: LlamaConfig, mode: str, device: torch.device, seed: int = 0,
                       dtype: torch.dtype | None = None) -> Llama:
    """Llama with N(0, 0.02) weights (HF's initializer_range) drawn on `device`, each block
    projection stored at `mode` (int8 | nf4 | bf16: the compute dtype) as soon as it is drawn.
    Everything else in `dtype` (default bf16 on CUDA, fp32 on CPU). Frozen, eval mode."""
    dtype = dtype or compute_dtype(device)
    precision = mode if mode in ("int8", "nf4") else {torch.bfloat16: "bf16", torch.float16: "fp16",
                                                      torch.float32: "fp32"}[dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen).mul_(0.02)

    with torch.device("meta"):
        model = Llama(cfg)
    for block in model.model.layers:
        for parent_name, names in PROJ.items():
            parent = getattr(block, parent_name)
            for name in names:
                old = getattr(parent, name)
                w = rand(old.out_features, old.in_features)
                setattr(parent, name, quant.quantize_linear(w, precision))
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


# ----------------------------------------------------------------------------- kernels in the model

def _rms_forward(self, x):
    return kernels.rms_norm(x, self.weight, self.eps)


def _attn_forward(self, x, cos, sin, mask):
    B, T, _ = x.shape
    q, k, v = kernels.lora_group(x, [self.q_proj, self.k_proj, self.v_proj])  # one dropout mask
    q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
    k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
    v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
    q, k = kernels.rope(q, k, cos, sin)
    if mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


def _mlp_forward(self, x):
    gate, up = kernels.lora_group(x, [self.gate_proj, self.up_proj])
    return self.down_proj(kernels.swiglu(gate, up))


@contextlib.contextmanager
def kernels_in_model(on: bool = True):
    """Run model/llama.py's RMSNorm, Attention and MLP through kernels/, and model/quant.py's
    int8 dequantize through kernels.int8_dequant, inside the `with` block (bench only: the
    same wiring belongs in llama.py / quant.py)."""
    if not on:
        yield
        return
    saved = [(llama_mod.RMSNorm, "forward", llama_mod.RMSNorm.forward),
             (llama_mod.Attention, "forward", llama_mod.Attention.forward),
             (llama_mod.MLP, "forward", llama_mod.MLP.forward),
             (quant, "dequantize_int8", quant.dequantize_int8)]
    llama_mod.RMSNorm.forward = _rms_forward
    llama_mod.Attention.forward = _attn_forward
    llama_mod.MLP.forward = _mlp_forward
    quant.dequantize_int8 = kernels.int8_dequant
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def check_kernels_in_model(device: torch.device) -> float:
    """Largest relative difference (max |a - b| / max |b|) in the logits and in each LoRA gradient
    of a tiny fp32 int8 model, with and without kernels_in_model. Training mode with gradient
    checkpointing, but dropout 0: then the shared-mask LoRA equals the per-adapter one exactly.
    Raises if above 1e-4."""
    from lora.inject import apply_lora
    cfg = bench_config("tiny")
    model = build_random_model(cfg, "int8", device, seed=1, dtype=torch.float32)  # the dequant hook too
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

    def run():
        logits = model(ids, mask)
        return [logits.detach()] + list(torch.autograd.grad(logits.square().mean(), lora))

    want = run()
    with kernels_in_model():
        got = run()
    diff = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(got, want))
    if not diff <= 1e-4:
        raise RuntimeError(f"kernels_in_model changes the tiny model's logits or LoRA grads by {diff:.3e} (relative)")
    return diff


# ----------------------------------------------------------------------------- one run

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_loss(model: Llama, ids: torch.Tensor, loss_mode: str, use_kernels: bool):
    """Closure returning the mean token loss for `ids` (B, T): full causal LM (predict ids[t+1]
    at t, as HF's labels=ids) or answer mode (one random label token after the last position)."""
    B, T = ids.shape
    if loss_mode == "answer":
        last = torch.full((B,), T - 1, device=ids.device)
        label = torch.randint(0, model.cfg.vocab_size, (B,), device=ids.device)
        return lambda: F.cross_entropy(model(ids, logits_at=last).float(), label)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets = targets.reshape(-1)

    def loss():
        h = model.hidden(ids).reshape(B * T, -1)  # (B*T, D)
        if use_kernels:
            total, count = kernels.chunked_cross_entropy(h, model.output_weight, targets)
            return total / count
        return F.cross_entropy(model.logits(h).float(), targets)  # all fp32 logits at once
    return loss


def train_run(cfg, mode: str, device, batch: int, seq: int, steps: int, warmup: int, loss_mode: str,
              use_kernels: bool, r: int = 32, alpha: float = 64, dropout: float = 0.1) -> dict:
    from lora.inject import apply_lora
    t0 = time.perf_counter()
    model = build_random_model(cfg, mode, device)
    torch.manual_seed(0)
    apply_lora(model, r=r, alpha=alpha, dropout=dropout)  # all seven projections
    model.grad_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    build_s = time.perf_counter() - t0
    with kernels_in_model(use_kernels):
        loss_fn = make_loss(model, ids, loss_mode, use_kernels)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(warmup + steps):
            sync(device)
            t = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    out = dict(mode=mode, kernels="on" if use_kernels else "off", loss_mode=loss_mode, batch=batch, seq=seq,
               step_s=round(med, 4), tokens_per_s=round(batch * seq / med, 1),
               peak_gib=None if peak is None else round(peak, 2), loss=round(float(loss.detach()), 4),
               lora_params=sum(p.numel() for p in params), build_s=round(build_s, 1))
    del model, opt, params, loss, loss_fn
    free(device)
    return out


# ----------------------------------------------------------------------------- the peer

def find_peer_script(given: str | None) -> Path | None:
    if given:
        return Path(given)
    return next((p for p in PEER_CANDIDATES if p.is_file()), None)


def run_peer(script: Path, args, modes: list[str], out_dir: Path | None) -> list[dict]:
    """Run peer_hf_peft.py once (train AND score rows for every mode) and parse its JSON lines.
    The raw rows are saved as <out>/peer.jsonl, which score_speed.py can reuse (--peer FILE)."""
    cmd = [sys.executable, str(script), "--size", args.size, "--device", args.device, "--modes", ",".join(modes),
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--score-batch", str(args.score_batch), "--path", args.peer_path]
    print("peer:", " ".join(cmd), flush=True)
    env = dict(os.environ, OUT="")  # the peer appends to $OUT/anchor.jsonl when set: we save our own copy
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.peer_timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr, rc = f"timed out after {args.peer_timeout} s", "timeout"
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


def peer_rows(args, modes: list[str], out_dir: Path | None) -> list[dict]:
    """--peer skip | run | a .jsonl file from an earlier peer run."""
    if args.peer == "skip":
        return []
    if args.peer != "run":
        path = Path(args.peer)
        if not path.is_file():
            raise SystemExit(f"--peer {args.peer}: no such file (use run, skip or a peer .jsonl)")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    script = find_peer_script(args.peer_script)
    if script is None or not script.is_file():
        print(f"peer: no peer_hf_peft.py (looked in {', '.join(map(str, PEER_CANDIDATES))}); skipped")
        return []
    return run_peer(script, args, modes, out_dir)


def peer_lookup(rows: list[dict], kind: str, mode: str) -> dict | None:
    return next((r for r in rows if r.get("kind") == kind and r.get("mode") == mode), None)


# ----------------------------------------------------------------------------- max batch

def one_step_peak(model, opt, cfg, batch, seq, device, loss_mode, use_kernels) -> float:
    """Peak GiB of one training step at batch x seq (inf on out-of-memory)."""
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    free(device)
    torch.cuda.reset_peak_memory_stats()
    try:
        make_loss(model, ids, loss_mode, use_kernels)().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    except torch.cuda.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return float("inf")


def find_max_batch(args, cfg, device, use_kernels) -> list[dict]:
    """Per sequence length, the largest batch whose training step peaks within --budget-gib.
    Peak memory is linear in the batch at a fixed length: measure batch 1 and 2, extrapolate,
    then confirm the prediction (and step down while it does not fit)."""
    from lora.inject import apply_lora
    if device.type != "cuda":
        raise SystemExit("--find-max-batch measures CUDA memory: run it on a GPU")
    model = build_random_model(cfg, "int8", device)
    torch.manual_seed(0)
    apply_lora(model, r=args.r, alpha=args.alpha, dropout=args.dropout)
    model.grad_checkpointing = True
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    with kernels_in_model(use_kernels):
        one_step_peak(model, opt, cfg, 1, 64, device, args.loss, use_kernels)  # Adam state exists from here
        for seq in args.lengths:
            p1 = one_step_peak(model, opt, cfg, 1, seq, device, args.loss, use_kernels)
            p2 = one_step_peak(model, opt, cfg, 2, seq, device, args.loss, use_kernels)
            if p1 > args.budget_gib:
                rows.append(dict(seq=seq, max_batch=0, peak_gib=round(p1, 2), tokens=0))
                print(f"  seq {seq}: even batch 1 peaks at {p1:.2f} GiB", flush=True)
                continue
            per = max(p2 - p1, 1e-6)
            b = max(1, int((args.budget_gib - p1) / per) + 1)
            peak = one_step_peak(model, opt, cfg, b, seq, device, args.loss, use_kernels)
            while b > 1 and peak > args.budget_gib:
                b -= 1
                peak = one_step_peak(model, opt, cfg, b, seq, device, args.loss, use_kernels)
            nxt = one_step_peak(model, opt, cfg, b + 1, seq, device, args.loss, use_kernels)
            if nxt <= args.budget_gib:  # the extrapolation was short: walk up
                while nxt <= args.budget_gib:
                    b, peak = b + 1, nxt
                    nxt = one_step_peak(model, opt, cfg, b + 1, seq, device, args.loss, use_kernels)
            rows.append(dict(seq=seq, max_batch=b, tokens=b * seq, peak_gib=round(peak, 2),
                             next_peak_gib=None if nxt == float("inf") else round(nxt, 2)))
            print(f"  seq {seq}: batch {b} ({b * seq} tokens) peaks at {peak:.2f} GiB; batch {b + 1}: "
                  f"{'OOM' if nxt == float('inf') else f'{nxt:.2f} GiB'}", flush=True)
    del model, opt
    free(device)
    return rows


# ----------------------------------------------------------------------------- main

def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to run
    p.add_argument("--size", choices=sorted(SIZES), default="8b" if cuda else "tiny",
                   help="model shape (the peer's: 8b = Llama-3-8B; default 8b on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu")
    p.add_argument("--modes", default="int8,nf4,bf16", help="comma-separated bases: int8, nf4, bf16")
    p.add_argument("--loss", choices=("full", "answer"), default="full",
                   help="full causal-LM loss (the peer's work unit) or one label token per row")
    p.add_argument("--kernels", choices=kernels.BACKENDS, default="auto",
                   help="auto/triton: run with kernels/ patched in; torch: the plain model")
    p.add_argument("--baseline-modes", default="",
                   help="also run these modes with --kernels torch, to show what the kernels buy")
    # work unit
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--r", type=int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=64, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout")
    p.add_argument("--peak-tflops", type=float, default=814.0,
                   help="bf16 dense peak for MFU, TFLOP/s (814: a measured 8192^3 matmul on the H100)")
    # max batch
    p.add_argument("--find-max-batch", action="store_true",
                   help="instead of timing: largest batch per length whose int8 step fits --budget-gib")
    p.add_argument("--budget-gib", type=float, default=14.0, help="memory budget for --find-max-batch")
    p.add_argument("--lengths", default="512,1024,2048,4096", help="sequence lengths for --find-max-batch")
    # peer
    p.add_argument("--peer", default="run", help="run (the peer script as a subprocess), skip, or a peer .jsonl")
    p.add_argument("--peer-script", help="peer_hf_peft.py (default: .peer/, shared/bench/ or ../shared/bench/)")
    p.add_argument("--peer-path", default="/tmp/rand-llama", help="where the peer saves its random model")
    p.add_argument("--peer-timeout", type=int, default=420, help="seconds before the peer is abandoned")
    p.add_argument("--score-batch", type=int, default=16, help="passed to the peer (its scoring rows)")
    # output
    p.add_argument("--out", help="folder for train.json / maxbatch.json / peer.jsonl")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.baseline_modes = [m for m in args.baseline_modes.split(",") if m]
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    for m in args.modes + args.baseline_modes:
        if m not in ("int8", "nf4", "bf16"):
            raise SystemExit(f"--modes: unknown base {m!r} (int8, nf4, bf16)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    kernels.set_backend(args.kernels)
    use_kernels = args.kernels != "torch"
    cfg = bench_config(args.size)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"train_speed: {args.size} ({n_params(cfg) / 1e6:,.1f} M params) on {gpu}, torch {torch.__version__}, "
          f"kernels {args.kernels} (triton {'yes' if kernels.have_triton() else 'no'})", flush=True)
    if use_kernels:
        print(f"kernels_in_model self-check (tiny fp32 int8, logits + LoRA grads): max relative diff "
              f"{check_kernels_in_model(device):.2e}", flush=True)

    if args.find_max_batch:
        rows = find_max_batch(args, cfg, device, use_kernels)
        if out_dir:
            (out_dir / "maxbatch.json").write_text(json.dumps(dict(budget_gib=args.budget_gib, rows=rows), indent=1))
        print(f"\nLargest int8 LoRA training step within {args.budget_gib:g} GiB ({args.size}, {args.loss} loss, "
              f"kernels {args.kernels}):")
        print(f"{'seq':>6} {'batch':>6} {'tokens':>8} {'peak GiB':>9}")
        for r in rows:
            print(f"{r['seq']:>6} {r['max_batch']:>6} {r['tokens']:>8} {r['peak_gib']:>9.2f}")
        return 0

    peer = peer_rows(args, sorted(set(args.modes + args.baseline_modes)), out_dir)  # first: a clean GPU
    env = next((r for r in peer if r.get("kind") == "env"), {})
    runs = [(m, use_kernels) for m in args.modes] + [(m, False) for m in args.baseline_modes]
    results = []
    for mode, on in runs:
        try:
            r = train_run(cfg, mode, device, args.batch, args.seq, args.steps, args.warmup, args.loss, on,
                          args.r, args.alpha, args.dropout)
        except Exception as e:  # noqa: BLE001 -- one failing base must not hide the others
            r = dict(mode=mode, kernels="on" if on else "off", error=repr(e)[:500])
            free(device)
        r["mfu"] = (None if "tokens_per_s" not in r else
                    round(6 * n_params(cfg) * r["tokens_per_s"] / (args.peak_tflops * 1e12), 4))
        pr = peer_lookup(peer, "train", mode)
        if pr and (pr.get("batch"), pr.get("seq")) != (args.batch, args.seq):  # another work unit
            print(f"peer train {mode}: batch x seq {pr.get('batch')} x {pr.get('seq')} is not ours; no ratio")
            pr = None
        r["peer_tokens_per_s"] = pr.get("tokens_per_s") if pr else None
        r["peer_peak_gib"] = pr.get("peak_gib") if pr else None
        r["ratio"] = (round(r["tokens_per_s"] / r["peer_tokens_per_s"], 3)
                      if r.get("tokens_per_s") and r["peer_tokens_per_s"] else None)
        results.append(r)
        print(json.dumps(r), flush=True)
        if out_dir:  # after every run: a stage time limit must not lose the finished ones
            (out_dir / "train.json").write_text(json.dumps(dict(size=args.size, gpu=gpu, args=vars(args), peer_env=env,
                                                                results=results, peer=peer), indent=1, default=str))

    print(f"\nLoRA training step, {args.size}, batch {args.batch} x {args.seq}, {args.loss} loss, r={args.r}, "
          f"checkpointing, AdamW; {gpu}"
          + (f"; peer bf16 matmul {env['matmul_bf16_tflops']:.0f} TFLOP/s" if env.get("matmul_bf16_tflops") else ""))
    print(f"{'base':<6} {'kernels':<8} {'step s':>7} {'tokens/s':>9} {'peak GiB':>9} {'MFU':>6} | "
          f"{'peer tok/s':>10} {'peer GiB':>9} {'ratio':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<6} {r['kernels']:<8} ERROR {r['error'][:100]}")
            continue
        print(f"{r['mode']:<6} {r['kernels']:<8} {r['step_s']:>7.3f} {r['tokens_per_s']:>9,.0f} "
              f"{fmt(r['peak_gib'], '9.2f'):>9} {fmt(r['mfu'], '6.1%'):>6} | "
              f"{fmt(r['peer_tokens_per_s'], ',.0f'):>10} {fmt(r['peer_peak_gib'], '.2f'):>9} "
              f"{fmt(r['ratio'], '.2f'):>6}")
    for r in peer:
        if r.get("kind") == "train" and "error" in r:
            print(f"peer {r['mode']}: ERROR {r['error'][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
