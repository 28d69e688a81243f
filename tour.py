"""A guided tour of the two ideas this project is built on: an 8-bit frozen base and a LoRA
adapter beside it. Run it (`python tour.py`, seconds on a CPU) and read it top to bottom; each
step names the file and function that does the same thing in the real model. Every claim it
prints is also asserted, and tests/test_tour.py runs it, so it cannot drift from the code.
"""
import torch
from torch import nn

from lora.lora import LoRALinear, lora_delta
from model.quant import Int8Linear, dequantize_int8, quantize_int8

torch.manual_seed(0)
d_in, d_out, r, alpha = 64, 32, 4, 8
x = torch.randn(16, d_in)  # 16 "tokens" of width 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


print("1. A float layer, y = x @ Wᵀ: torch.nn.Linear, as every projection of a checkpoint is.")
dense = nn.Linear(d_in, d_out, bias=False)
W = dense.weight.detach()
print(f"   W {tuple(W.shape)} fp32: {W.numel() * 4:,} bytes")

print("\n2. Quantize W to 8 bits, one scale per output row (model/quant.py: quantize_int8).")
#    SCB[i] = max_j |W[i, j]|;  q[i, j] = round(W[i, j] · 127 / SCB[i]), an int8 in [-127, 127]
q, scb = quantize_int8(W)
print(f"   q {tuple(q.shape)} {q.dtype}, row 0 starts {q[0, :6].tolist()}")
print(f"   SCB {tuple(scb.shape)} fp32 (the largest |w| of each row), SCB[0] = {scb[0]:.4f}")
print(f"   storage: {q.numel() + scb.numel() * 4:,} bytes, {W.numel() * 4 / (q.numel() + scb.numel() * 4):.1f}x less")
W_hat = dequantize_int8(q, scb, torch.float32)  # W ≈ q · SCB / 127 (model/quant.py: dequantize_int8)
torch.testing.assert_close(W_hat, q.float() * scb[:, None] / 127)  # the textbook form, to fp32 rounding
print(f"   dequantized W differs from W by at most {(W_hat - W).abs().max():.2e} "
      f"(half a step, SCB/254 = {(scb / 254).max():.2e})")
assert (W_hat - W).abs().max() <= (scb / 254).max() * 1.0001

print("\n3. The 8-bit layer: dequantize, then one plain matmul (model/quant.py: Int8Linear.forward).")
base = Int8Linear.from_float(dense)  # bitsandbytes storage (Int8Params + SCB), our compute
err = rel_err(base(x), dense(x))
print(f"   relative error of its output against the float layer: {err:.2e}")
assert err < 0.01

print("\n4. Wrap it in LoRA (lora/lora.py: LoRALinear): y = base(x) + s · B(A(dropout(x))), s = alpha / r.")
layer = LoRALinear(base, r=r, alpha=alpha, dropout=0.0)
trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
print(f"   A {tuple(layer.lora_A.weight.shape)} Kaiming-uniform, B {tuple(layer.lora_B.weight.shape)} zeros, "
      f"s = {layer.scaling}")
print(f"   trainable: {trainable:,} numbers (A and B) against {d_in * d_out:,} frozen in the base")
assert trainable == r * (d_in + d_out)
assert torch.equal(layer(x), base(x))  # B = 0: step 0 is exactly the base model
print("   with B = 0 the output equals the base layer's exactly: training starts from the base model")

print("\n5. Train A and B on a toy target: the float layer plus a rank-2 change (train.py does this for")
print("   every projection of the model, with engine/loss.py's loss).")
change = torch.randn(d_out, 2) @ torch.randn(2, d_in) * 0.05
target = x @ (W + change).T
opt = torch.optim.AdamW([layer.lora_A.weight, layer.lora_B.weight], lr=1e-2)
losses = []
for step in range(200):
    loss = (layer(x) - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()  # gradients reach A and B only: the int8 weight has none
    opt.step()
    losses.append(loss.item())
print(f"   mean squared error {losses[0]:.4f} -> {losses[-1]:.2e} after 200 AdamW steps")
assert losses[-1] < losses[0] / 10 and base.weight.grad is None

print("\n6. Merge: W' = dequantize(W) + s · B @ A, one float matrix (lora/merge.py, lora/lora.py: lora_delta).")
merged = nn.Linear(d_in, d_out, bias=False)
with torch.no_grad():
    merged.weight.copy_(base.dequantize(torch.float32) + lora_delta(layer.lora_A.weight, layer.lora_B.weight,
                                                                    layer.scaling))
    diff = (merged(x) - layer(x)).abs().max().item()
print(f"   merged layer vs base + adapter: max |difference| {diff:.1e} (float rounding)")
assert diff < 1e-5
print("\nThe real model is 7 such projections per block (model/llama.py: PROJECTIONS), loaded from a")
print("checkpoint by model/load.py, wrapped by lora/inject.py: apply_lora, trained by train.py.")
