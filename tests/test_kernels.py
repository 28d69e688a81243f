"""kernels/: every Triton kernel against the PyTorch definition it replaces (model/llama.py,
model/quant.py), forward and backward; the switch and its fallback; the chunked cross-entropy
(engine/loss.py) and bench/fused_lora.py against their references.

Where the Triton kernels run:
  * CUDA available: in this process, on CUDA tensors, fp32 and bf16, odd and model-sized shapes.
  * CPU only: in a SUBPROCESS with TRITON_INTERPRET=1 (`python tests/test_kernels.py --interpret`).
    triton.jit decides interpreted-or-compiled when a kernel is defined, and that is process-wide;
    a subprocess keeps the variable (and the interpreter's slowness) out of every other test.
  * triton not importable: those comparisons are skipped.
Each comparison prints the max and mean absolute difference (`pytest -s` shows the table).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and "--interpret" in sys.argv:  # the interpreter subprocess (PYTHONPATH=ROOT):
    os.environ["TRITON_INTERPRET"] = "1"  # set before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from bench.fused_lora import lora_group, lora_multi_cat, lora_multi_torch  # noqa: E402
from engine.loss import chunked_cross_entropy, cross_entropy_torch  # noqa: E402
from model.llama import apply_rope, rms_norm, swiglu  # noqa: E402
from model.quant import dequantize_int8  # noqa: E402


class ref:  # noqa: N801 -- the PyTorch definitions each Triton kernel replaces
    int8_dequant_torch = staticmethod(dequantize_int8.reference)
    rms_norm_torch = staticmethod(rms_norm.reference)
    rope_torch = staticmethod(apply_rope.reference)
    swiglu_torch = staticmethod(swiglu.reference)

TRITON_KERNELS = ("int8_dequant", "rms_norm", "rope", "swiglu")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # max |diff| / max(1, max |ref|)


# ---------------------------------------------------------------- Triton vs reference


def _row(kernel, what, dtype, shape, got, want):
    d = (got.float() - want.float()).abs()
    scale = max(1.0, want.float().abs().max().item())
    tol = TOL[dtype] * scale
    return dict(kernel=kernel, what=what, dtype=str(dtype).replace("torch.", ""), shape=shape,
                max=d.max().item(), mean=d.mean().item(), tol=tol,
                ok=bool(d.max().item() <= tol and torch.isfinite(got).all()))


def _grads(fn, inputs, dys):
    """Outputs of fn(*inputs) and the grads of sum(out * dy) w.r.t. inputs needing grad."""
    ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    need = [t for t in ins if t.requires_grad]
    grads = torch.autograd.grad(outs, need, dys)
    return [o.detach() for o in outs], list(grads)


def compare_all(device: str, dtype: torch.dtype, size: str = "odd") -> list[dict]:
    """Every Triton kernel vs its reference on random inputs; one row per output / gradient.

    size: "small" (one odd shape each: the interpreter is slow), "odd" (several odd shapes),
    "big" (odd shapes plus Llama-3-8B-sized ones, CUDA only).
    """
    small, big = size == "small", size == "big"
    from kernels import triton_ops as tri  # imported here: after TRITON_INTERPRET is set

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=False, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    rows = []
    # int8 dequantize: odd shapes span several tiles and cut the last one
    shapes = [(37, 129)] + ([] if small else [(70, 600)]) + ([(14336, 4096)] if big else [])
    for M, N in shapes:
        w = torch.randint(-127, 128, (M, N), generator=g, dtype=torch.int8).to(device)
        scb = (torch.rand(M, generator=g) * 4).to(device)
        rows.append(_row("int8_dequant", "out", dtype, [M, N], tri.int8_dequant_triton(w, scb, dtype),
                         ref.int8_dequant_torch(w, scb, dtype)))

    # RMSNorm, with and without a weight gradient (frozen in LoRA, trained elsewhere)
    shapes = [(13, 129) if small else (2, 37, 129)] + ([(4, 512, 4096)] if big else [])
    for shape in shapes:
        for w_grad in (True, False):
            x = rnd(*shape, grad=True, scale=3.0)
            w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device, dtype).requires_grad_(w_grad)
            dy = (rnd(*shape),)
            (yr,), gr = _grads(lambda a, b: ref.rms_norm_torch(a, b, 1e-5), [x, w], dy)
            (yt,), gt = _grads(lambda a, b: tri.rms_norm_triton(a, b, 1e-5), [x, w], dy)
            tag = "" if w_grad else " (w frozen)"
            rows.append(_row("rms_norm", "y" + tag, dtype, list(shape), yt, yr))
            rows.append(_row("rms_norm", "dx" + tag, dtype, list(shape), gt[0], gr[0]))
            if w_grad:
                rows.append(_row("rms_norm", "dw", dtype, list(shape), gt[1], gr[1]))

    # RoPE: q is the transpose of a (B, T, H, hd) view, as model/llama.py makes it; head_dim 18
    # has a non-power-of-two half; cos/sin random (not just cos/sin of angles) to pin the algebra.
    cases = [(1, 13, 4, 2, 16, 2)] + ([] if small else [(2, 19, 5, 3, 18, 3)]) \
        + ([(4, 512, 32, 8, 128, 3)] if big else [])
    for B, T, HQ, HK, hd, cos_dim in cases:
        q = rnd(B, T, HQ, hd).transpose(1, 2).requires_grad_(True)  # (B, HQ, T, hd), strided
        k = rnd(B, T, HK, hd).transpose(1, 2).requires_grad_(True)
        cs_shape = (B, T, hd) if cos_dim == 3 else (T, hd)
        cos, sin = rnd(*cs_shape), rnd(*cs_shape)
        dys = (rnd(B, HQ, T, hd), rnd(B, HK, T, hd))
        (qr, kr), gr = _grads(lambda a, b: ref.rope_torch(a, b, cos, sin), [q, k], dys)
        (qt, kt), gt = _grads(lambda a, b: tri.rope_triton(a, b, cos, sin), [q, k], dys)
        shape = [B, HQ, HK, T, hd]
        rows += [_row("rope", f"q (cos {cos_dim}d)", dtype, shape, qt, qr),
                 _row("rope", f"k (cos {cos_dim}d)", dtype, shape, kt, kr),
                 _row("rope", f"dq (cos {cos_dim}d)", dtype, shape, gt[0], gr[0]),
                 _row("rope", f"dk (cos {cos_dim}d)", dtype, shape, gt[1], gr[1])]

    # SwiGLU
    shapes = [(37, 129)] + ([] if small else [(3, 37, 129)]) + ([(4, 512, 14336)] if big else [])
    for shape in shapes:
        gate, up = rnd(*shape, grad=True, scale=3.0), rnd(*shape, grad=True)
        dy = (rnd(*shape),)
        (yr,), gr = _grads(ref.swiglu_torch, [gate, up], dy)
        (yt,), gt = _grads(tri.swiglu_triton, [gate, up], dy)
        rows += [_row("swiglu", "y", dtype, list(shape), yt, yr),
                 _row("swiglu", "dgate", dtype, list(shape), gt[0], gr[0]),
                 _row("swiglu", "dup", dtype, list(shape), gt[1], gr[1])]
    return rows


def _print_rows(rows, where):
    print(f"\nTriton vs PyTorch reference ({where}):")
    print(f"  {'kernel':<13}{'what':<18}{'dtype':<10}{'shape':<22}{'max|diff|':>11}{'mean|diff|':>12}{'tol':>10}")
    for r in rows:
        print(f"  {r['kernel']:<13}{r['what']:<18}{r['dtype']:<10}{str(r['shape']):<22}"
              f"{r['max']:>11.3e}{r['mean']:>12.3e}{r['tol']:>10.1e}{'' if r['ok'] else '  FAIL'}")


@pytest.fixture(scope="module")
def triton_rows():
    if not kernels.have_triton():
        pytest.skip("triton is not importable")
    if torch.cuda.is_available():
        rows = compare_all("cuda", torch.float32, "big") + compare_all("cuda", torch.bfloat16, "big")
        where = f"CUDA, {torch.cuda.get_device_name(0)}"
    else:
        env = dict(os.environ, TRITON_INTERPRET="1", KERNELS="triton", PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpret"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"interpreter subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        where = "CPU, TRITON_INTERPRET=1 (bf16 casts truncate there: ~1 ulp more)"
    _print_rows(rows, where)
    return rows


@pytest.mark.parametrize("kernel", TRITON_KERNELS)
def test_triton_matches_reference(triton_rows, kernel):
    rows = [r for r in triton_rows if r["kernel"] == kernel]
    assert rows, f"no comparison ran for {kernel}"
    bad = [r for r in rows if not r["ok"]]
    assert not bad, f"{kernel}: {bad}"


# ---------------------------------------------------------------- the switch


@pytest.fixture
def backend():
    yield kernels.set_backend
    kernels.set_backend(None)


def test_auto_picks_reference_on_cpu(backend, monkeypatch):
    monkeypatch.delenv("KERNELS", raising=False)
    backend(None)
    x = torch.randn(5, 37, 129)
    assert kernels.get_backend() == "auto" and not kernels.use_triton(x)
    w = torch.randn(129)
    assert torch.equal(rms_norm(x, w, 1e-5), ref.rms_norm_torch(x, w, 1e-5))
    g, u = torch.randn(37, 129), torch.randn(37, 129)
    assert torch.equal(swiglu(g, u), ref.swiglu_torch(g, u))
    q, k, cos, sin = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    for a, b in zip(apply_rope(q, k, cos, sin), ref.rope_torch(q, k, cos, sin)):
        assert torch.equal(a, b)
    wi, scb = torch.randint(-127, 128, (37, 129), dtype=torch.int8), torch.rand(37)
    assert torch.equal(dequantize_int8(wi, scb, torch.bfloat16),
                       ref.int8_dequant_torch(wi, scb, torch.bfloat16))


def test_backend_block_restores_the_previous_setting(backend):
    backend("auto")
    with pytest.raises(RuntimeError):
        with kernels.backend("torch"):
            assert kernels.get_backend() == "torch"
            raise RuntimeError  # left by an exception: restored all the same
    assert kernels.get_backend() == "auto"  # what was set before, not the environment's value


def test_env_and_setter(backend, monkeypatch):
    monkeypatch.setenv("KERNELS", "torch")
    backend(None)
    assert kernels.get_backend() == "torch"
    backend("auto")  # the setter wins over the environment
    assert kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="set_backend"):
        backend("cuda")
    backend(None)
    monkeypatch.setenv("KERNELS", "fast")
    with pytest.raises(ValueError, match="KERNELS"):
        kernels.get_backend()


def test_forced_triton_without_triton_raises(backend, monkeypatch):
    monkeypatch.setattr("kernels.have_triton", lambda: False)
    backend("triton")
    with pytest.raises(RuntimeError, match="triton"):
        kernels.use_triton(torch.zeros(1))
    backend("auto")
    assert not kernels.use_triton(torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_dequant_is_one_rounding_of_the_fp32_product(dtype):
    # W = w_int8 * (SCB / 127), computed in fp32 and rounded to `dtype` once.
    w, scb = torch.randint(-127, 128, (37, 129), dtype=torch.int8), torch.rand(37) * 3
    want = (w.float() * (scb * (1.0 / 127.0))[:, None]).to(dtype)
    assert torch.equal(dequantize_int8(w, scb, dtype), want)


def test_a_failing_triton_kernel_falls_back_once_with_a_warning(backend, monkeypatch):
    import types
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("PTX compile failed")
    fake = types.SimpleNamespace(swiglu_triton=broken)
    monkeypatch.setitem(sys.modules, "kernels.triton_ops", fake)
    monkeypatch.setattr(kernels, "triton_ops", fake, raising=False)
    monkeypatch.setattr(kernels, "_failed", set())
    monkeypatch.setattr(kernels, "use_triton", lambda *t: True)  # as on a CUDA tensor
    backend("auto")
    g, u = torch.randn(5, 7), torch.randn(5, 7)
    with pytest.warns(UserWarning, match="swiglu_triton failed.*PTX compile failed"):
        y = swiglu(g, u)
    assert torch.equal(y, ref.swiglu_torch(g, u))
    assert torch.equal(swiglu(g, u), y) and len(calls) == 1  # not tried again in this process
    backend("triton")  # asked for explicitly: the error surfaces
    monkeypatch.setattr(kernels, "_failed", set())
    with pytest.raises(RuntimeError, match="PTX"):
        swiglu(g, u)


def test_int8_dequant_reference_matches_bitsandbytes_formula():
    w, scb = torch.randint(-127, 128, (37, 129), dtype=torch.int8), torch.rand(37) * 3
    want = w.float() * scb[:, None] / 127  # the textbook form: identical up to fp32 rounding
    torch.testing.assert_close(ref.int8_dequant_torch(w, scb, torch.float32), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- chunked cross-entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_full(dtype):
    g = torch.Generator().manual_seed(1)
    N, D, V = 37, 29, 129
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) / 4).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = -100
    loss_r, n_r = cross_entropy_torch(hidden, weight, targets)
    dh_r, dw_r = torch.autograd.grad(loss_r * 0.7, [hidden, weight])
    loss_c, n_c = chunked_cross_entropy(hidden, weight, targets, chunk=8)  # several uneven chunks
    dh_c, dw_c = torch.autograd.grad(loss_c * 0.7, [hidden, weight])
    assert loss_c.dtype == torch.float32 and int(n_c) == int(n_r) == N - len(range(0, N, 3))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in (("loss", loss_c, loss_r), ("dhidden", dh_c, dh_r), ("dweight", dw_c, dw_r)):
        d = (a.float() - b.float()).abs()
        print(f"chunked CE {dtype} {name}: max|diff| {d.max().item():.3e} mean {d.mean().item():.3e}")
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert not dh_c[::3].any()  # ignored rows get exactly no gradient


def test_chunked_cross_entropy_all_ignored_and_default_chunk():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    loss, n = chunked_cross_entropy(hidden, weight, torch.full((5,), -100))
    assert float(loss.detach()) == 0.0 and int(n) == 0
    loss.backward()
    assert hidden.grad is not None and not hidden.grad.any()
    with pytest.raises(ValueError, match="hidden"):
        chunked_cross_entropy(hidden[None], weight, torch.zeros(5, dtype=torch.long))


# ---------------------------------------------------------------- fused LoRA


def _adapters(g, d_in, outs, r=4):
    a = [torch.randn(r, d_in, generator=g).requires_grad_(True) for _ in outs]
    b = [torch.randn(o, r, generator=g).requires_grad_(True) for o in outs]
    return a, b, [2.0, 2.0, 0.5][:len(outs)]


@pytest.mark.parametrize("training", [False, True])
def test_lora_multi_cat_matches_reference(training):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 37, 129, generator=g).to(torch.bfloat16)
    a, b, s = _adapters(g, 129, (64, 32, 32))
    torch.manual_seed(7)
    ref_out = lora_multi_torch(x, a, b, s, dropout=0.1, training=training)
    ref_grads = torch.autograd.grad(sum(o.float().sum() for o in ref_out), a + b)
    torch.manual_seed(7)  # same seed: the one shared mask is the same draw in both
    cat_out = lora_multi_cat(x, a, b, s, dropout=0.1, training=training)
    cat_grads = torch.autograd.grad(sum(o.float().sum() for o in cat_out), a + b)
    for o_r, o_c in zip(ref_out, cat_out):
        assert o_c.dtype == torch.bfloat16 and o_c.shape == o_r.shape
        torch.testing.assert_close(o_c.float(), o_r.float(), rtol=1e-2, atol=1e-2)
    for g_r, g_c in zip(ref_grads, cat_grads):
        torch.testing.assert_close(g_c, g_r, rtol=1e-4, atol=1e-3)


def test_lora_multi_shares_one_dropout_mask():
    # With A = B = I, each adapter's update is s * dropout(x): the zero patterns must coincide.
    x = torch.ones(4, 16)
    eye = torch.eye(16)
    torch.manual_seed(0)
    outs = lora_multi_torch(x, [eye, eye, eye], [eye, eye, eye], [1.0, 1.0, 1.0], 0.5, True)
    assert (outs[0] == 0).any() and (outs[0] != 0).any()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_lora_group_equals_lora_linear_in_eval():
    lora_mod = pytest.importorskip("lora.lora")
    torch.manual_seed(3)
    layers = [lora_mod.LoRALinear(torch.nn.Linear(29, o, bias=False), r=4, alpha=8, dropout=0.1)
              for o in (16, 8, 8)]
    for m in layers:
        torch.nn.init.normal_(m.lora_B.weight)  # B = 0 would make the adapter invisible
        m.eval()
    x = torch.randn(2, 5, 29)
    with torch.no_grad():
        for m, y in zip(layers, lora_group(x, layers)):
            torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
        layers[1].train()
        with pytest.raises(ValueError, match="train/eval"):
            lora_group(x, layers)


if __name__ == "__main__":
    # Subprocess mode (see the module docstring): print the comparison rows as one JSON line.
    dev = "cuda" if torch.cuda.is_available() and "--interpret" not in sys.argv else "cpu"
    out = compare_all(dev, torch.float32, "odd") + compare_all(dev, torch.bfloat16, "small")
    print(json.dumps(out))
