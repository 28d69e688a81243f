"""The frozen 8-bit / 4-bit linears against bitsandbytes' own layers (CPU, fp32)."""
import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import quant
from model.quant import Int8Linear, NF4Linear, dequantize, quantize_int8, quantize_linear


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def lin():
    torch.manual_seed(0)
    return nn.Linear(128, 96, bias=False)


@pytest.fixture
def x():
    torch.manual_seed(1)
    x = torch.randn(3, 7, 128)
    x[..., 5] *= 20  # an outlier feature column, so LLM.int8's fp16 decomposition has work to do
    return x


def bnb_linear(w, threshold, training):
    """bitsandbytes' own Linear8bitLt on `w`, quantized by bnb (.to(device) quantizes)."""
    m = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=threshold)
    m.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    return m.to("cpu").train(training)


@pytest.fixture
def int8_mode():
    yield
    quant.INT8_MATMUL = "dequant"


def test_quantize_int8_is_bnb_formula(lin):
    w = lin.weight.detach()
    q, scb = quantize_int8(w)
    q_bnb, scb_bnb, _ = bnbF.int8_vectorwise_quant(w.clone())
    assert q.dtype == torch.int8 and scb.dtype == torch.float32 and scb.shape == (96,)
    assert torch.equal(q, q_bnb) and torch.equal(scb, scb_bnb)
    # Linear8bitLt quantizes from fp16: identical on an fp16-representable (e.g. bf16) weight.
    w16 = w.half().float()
    assert torch.equal(quantize_int8(w16)[0], bnb_linear(w16, 0.0, False).weight.data)
    # An all-zero row stays zero (bnb would divide by zero).
    w0 = w.clone()
    w0[3] = 0
    q0, s0 = quantize_int8(w0)
    assert not q0[3].any() and s0[3] == 0 and torch.equal(q0[4], q[4])


def test_dequant_path_within_bnb_error(lin, x):
    w = lin.weight.detach().half().float()  # fp16-exact, as bnb quantizes from fp16
    ref = x @ w.T
    m = Int8Linear.from_float(w)
    with torch.no_grad():
        y = m(x)
        y_llm_int8 = bnb_linear(w, 6.0, training=False)(x)  # real LLM.int8 (activations quantized too)
        y_bnb_dequant = bnb_linear(w, 6.0, training=True)(x)  # bnb on CPU when training: dequant+matmul
    # Weight-only quantization error, no larger than bitsandbytes' own 8-bit layer's.
    assert rel(y, ref) <= rel(y_llm_int8, ref)
    assert rel(y, ref) < 5e-3
    # And the same numbers bitsandbytes computes when it dequantizes.
    torch.testing.assert_close(y, y_bnb_dequant, atol=1e-5, rtol=1e-5)


def test_bnb_path_is_linear8bitlt(lin, x, int8_mode):
    m = Int8Linear.from_float(lin.weight.half().float())
    quant.INT8_MATMUL = "bnb"
    assert quant.BNB_THRESHOLD == 6.0
    with torch.no_grad():
        y = m(x)
        y_ref = bnb_linear(lin.weight.detach().half().float(), 6.0, training=False)(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_paths_agree_grads_to_input_only(lin, x, int8_mode):
    m = Int8Linear.from_float(lin)
    g = torch.randn(3, 7, 96)
    out, grads = {}, {}
    for mode in ("dequant", "bnb"):
        quant.INT8_MATMUL = mode
        xi = x.clone().requires_grad_()
        out[mode] = m(xi)
        out[mode].backward(g)
        grads[mode] = xi.grad
        assert m.weight.grad is None and not m.weight.requires_grad and m.SCB.grad is None
    assert rel(out["bnb"], out["dequant"]) < 1e-2
    # grad_input = g @ W_dequant on both paths (bnb dequantizes for backward too).
    expected = g @ m.dequantize()
    torch.testing.assert_close(grads["dequant"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["bnb"], expected, atol=1e-5, rtol=1e-5)


def test_dequant_saves_int8_not_float_weight(lin, x):
    m = Int8Linear.from_float(lin)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x.requires_grad_()).sum().backward()
    assert {t.dtype for t in saved} == {torch.int8, torch.float32}
    assert not any(t.dtype == torch.float32 and t.shape == (96, 128) for t in saved)


def test_dequantize_hook_is_looked_up_at_call_time(lin, x, monkeypatch):
    calls = []
    orig = quant.dequantize_int8
    monkeypatch.setattr(quant, "dequantize_int8", lambda w, s, d: calls.append(d) or orig(w, s, d))
    Int8Linear.from_float(lin)(x.requires_grad_()).sum().backward()
    assert calls == [torch.float32, torch.float32]  # forward, then backward recomputes


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_activation_checkpointing(precision, lin, x):
    torch.manual_seed(2)
    net = nn.Sequential(quantize_linear(lin.weight, precision), nn.GELU(),
                        quantize_linear(torch.randn(128, 96) * 0.1, precision))
    grads = []
    for ckpt in (False, True):
        xi = x.clone().requires_grad_()
        y = checkpoint(net, xi, use_reentrant=False) if ckpt else net(xi)
        y.square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_int8_to_deepcopy_state_dict(lin, x):
    src = nn.Linear(128, 96, bias=True)
    m = Int8Linear.from_float(src)
    assert isinstance(m.weight, bnb.nn.Int8Params) and m.weight.SCB is m.SCB
    sd = m.state_dict()
    assert {k: v.dtype for k, v in sd.items()} == {"weight": torch.int8, "SCB": torch.float32,
                                                   "bias": torch.float32}
    m.to(torch.bfloat16)  # a model-wide cast must not touch the int8 weight or the fp32 scales
    assert m.weight.dtype == torch.int8 and m.SCB.dtype == torch.float32 and m.bias.dtype == torch.bfloat16
    assert m.weight.SCB is m.SCB and torch.equal(m.SCB, sd["SCB"])
    c = copy.deepcopy(m)
    assert c.weight.SCB is c.SCB and torch.equal(c(x.bfloat16()), m(x.bfloat16()))
    fresh = Int8Linear(128, 96, bias=True)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), Int8Linear.from_float(src)(x))
    m.to("meta")
    assert m.weight.is_meta and m.SCB.is_meta and m.weight.SCB is m.SCB
    assert "precision=int8" in repr(m) and "in_features=128, out_features=96" in repr(m)


def test_from_int8_keeps_tensors():
    q = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    scb = torch.rand(8) + 0.5
    m = Int8Linear.from_int8(q, scb)
    assert m.weight.data.data_ptr() == q.data_ptr()  # no copy
    torch.testing.assert_close(m.dequantize(), q.float() * scb[:, None] / 127)
    with pytest.raises(ValueError, match="int8"):
        Int8Linear.from_int8(q.float(), scb)


def test_nf4(lin, x):
    m = NF4Linear.from_float(lin)
    w_dq = m.dequantize()
    assert w_dq.shape == (96, 128) and 0 < rel(w_dq, lin.weight) < 0.15  # NF4's typical error
    xi = x.clone().requires_grad_()
    y = m(xi)
    torch.testing.assert_close(y, x @ w_dq.T, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert xi.grad is not None and not m.weight.requires_grad and m.weight.grad is None
    assert m(x.bfloat16()).dtype == torch.bfloat16  # computes in the activation's dtype
    assert "precision=nf4" in repr(m)
    assert {"weight", "weight.absmax"} <= set(m.state_dict())


def test_quantize_linear_and_dequantize(lin):
    w = lin.weight.detach()
    b = torch.randn(96)
    for precision, cls, tol in [("int8", Int8Linear, 5e-3), ("nf4", NF4Linear, 0.15),
                                ("bf16", nn.Linear, 5e-3), ("fp16", nn.Linear, 1e-3), ("fp32", nn.Linear, 0)]:
        m = quantize_linear(w, precision, bias=b)
        assert type(m) is cls and not any(p.requires_grad for p in m.parameters())
        assert rel(dequantize(m), w) <= tol
        assert dequantize(m, torch.bfloat16).dtype == torch.bfloat16
        torch.testing.assert_close(m(torch.zeros(1, 128, dtype=m.bias.dtype)).float(), b[None].to(m.bias.dtype).float())
    with pytest.raises(ValueError, match="precision 'int4'"):
        quantize_linear(w, "int4")
    with pytest.raises(TypeError, match="Conv1d"):
        dequantize(nn.Conv1d(1, 1, 1))


# QLoRA's NF4 code (Dettmers et al. 2023, appendix E): 16 quantiles of N(0, 1), scaled to [-1, 1].
NF4_CODE = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def test_nf4_dequantize_is_the_code_table_times_block_absmax():
    # An independent decode of the packed storage: two 4-bit indices per byte (high nibble
    # first), each block of 64 weights scaled by its absmax.
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    m = NF4Linear.from_float(w, compress_statistics=False)
    packed, qs = m.weight.data.flatten(), m.weight.quant_state
    idx = torch.stack([(packed >> 4).long(), (packed & 15).long()], 1).flatten()
    want = (NF4_CODE[idx].view(-1, qs.blocksize) * qs.absmax.float()[:, None]).view(48, 128)
    assert torch.equal(m.dequantize(torch.float32), want)
    assert (want - w).abs().max() <= 0.5 * w.abs().max()  # a 4-bit code: coarse, but the right weights


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_layer_computes_x_times_its_dequantized_weight(precision, lin, x):
    # One plain GEMM on the dequantized weight, forward and backward: so a merged export of
    # base + adapter (lora/merge.py --precision) is the trained function to float rounding.
    m = quantize_linear(lin.weight, precision)
    w = m.dequantize(torch.float32)
    xi = x.clone().requires_grad_()
    y = m(xi)
    torch.testing.assert_close(y, x @ w.T, atol=1e-6, rtol=1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(xi.grad, dy @ w, atol=1e-6, rtol=1e-6)
