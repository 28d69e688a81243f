"""LoRALinear, apply_lora, adapter files and the merge CLI (CPU, fp32, tiny configs)."""
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import kernels
from lora.inject import apply_lora, count_params, lora_modules, lora_state_dict, param_summary
from lora.io import AdapterError, load_adapter, read_adapter_config, read_record, save_adapter
from lora.lora import LoRALinear
from model.config import LlamaConfig
from model.llama import Llama

FILE = "adapter_model.safetensors"
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model(seed=0, **cfg) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig.tiny(**cfg)).eval()


def randomize_lora(model, seed=1, std=0.1):
    """Nonzero B (and fresh A) so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)
    return model


def ids(n=2, t=13, seed=0):
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- LoRALinear

def test_b_zero_gives_exactly_the_base_output():
    model = tiny_model()
    x = ids()
    with torch.no_grad():
        ref = model(x)
        apply_lora(model, r=4, alpha=8, dropout=0.1)
        model.train()  # dropout active on the adapter input: still nothing added while B = 0
        out = model(x)
    assert torch.equal(out, ref)
    m = model.model.layers[0].self_attn.q_proj
    assert m.lora_A.weight.shape == (4, 64) and m.lora_B.weight.shape == (64, 4)
    assert (m.lora_B.weight == 0).all() and m.lora_A.weight.abs().max() > 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on (r, in): U(-1/√in, 1/√in)
    assert m.lora_A.weight.abs().max() <= bound


def test_training_step_changes_only_lora():
    model = tiny_model()
    apply_lora(model, r=4, alpha=8, dropout=0.1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x, y = ids(), ids(seed=1)
    for _ in range(2):  # step 1 moves B (A's grad is B-weighted, so 0); step 2 moves A too
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
        else:
            assert not torch.equal(v, before[k]), f"{k} did not train"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_merge_equals_unmerged_and_unmerge_restores():
    model = randomize_lora(apply_lora(tiny_model(), r=4, alpha=8, dropout=0.0))
    x = ids()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        ref = model(x)
        for m in lora_modules(model).values():
            m.merge()
        merged = model(x)
        assert not torch.equal(model.model.layers[0].mlp.up_proj.base_layer.weight,
                               weights["model.layers.0.mlp.up_proj.base_layer.weight"])
        for m in lora_modules(model).values():
            m.unmerge()
        after = model(x)
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)
    for k, w in weights.items():
        torch.testing.assert_close(model.state_dict()[k], w, atol=1e-6, rtol=0)


def test_scaling_rslora_and_dropout_only_on_the_adapter_input():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    plain, rs = LoRALinear(base, 4, 8), LoRALinear(nn.Linear(16, 8), 4, 8, rslora=True)
    assert plain.scaling == 2.0 and rs.scaling == 4.0  # alpha / r and alpha / √r
    m = LoRALinear(base, 4, 8, dropout=0.5).train()
    nn.init.normal_(m.lora_B.weight)
    x = torch.randn(3, 16)
    from lora.lora import apply_dropout, dropout_bits, dropout_masks
    for name in ("auto", "torch"):  # CPU default: 16-bit draws; torch: F.dropout's, as PEFT
        with dropout_masks(name):
            torch.manual_seed(7)
            out = m(x)
            torch.manual_seed(7)
            drop = dropout_bits(x, 0.5) if name == "auto" else nn.functional.dropout(x, 0.5)
        ref = base(x) + drop @ m.lora_A.weight.T @ m.lora_B.weight.T * 2.0
        torch.testing.assert_close(out, ref)
    assert "r=4" in repr(m) and "dropout=0.5" in repr(m)


def test_dropout_masks_are_redrawn_identically_in_the_checkpoint_recompute():
    model = randomize_lora(apply_lora(tiny_model(), r=4, alpha=8, dropout=0.3)).train()
    x = ids()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        torch.manual_seed(11)
        model(x).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
    torch.manual_seed(12)  # and the masks matter: another seed gives other gradients
    model.zero_grad()
    model(x).float().logsumexp(-1).mean().backward()
    assert not torch.allclose(model.model.layers[0].mlp.up_proj.lora_A.weight.grad,
                              grads[0]["model.layers.0.mlp.up_proj.lora_A.weight"])


def test_bf16_base_keeps_fp32_adapter():
    base = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    m = LoRALinear(base, 4, 8)
    nn.init.normal_(m.lora_B.weight)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
    y.float().sum().backward()
    assert m.lora_A.weight.grad.dtype == torch.float32 and base.weight.grad is None
    ref = base(x).float() + (x.float() @ m.lora_A.weight.T @ m.lora_B.weight.T * 2.0)
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)


def test_int8_base_matches_lora_on_dequantized_weight():
    from model.quant import Int8Linear, dequantize
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    q = Int8Linear.from_float(lin)
    ref_base = nn.Linear(64, 48, bias=False)
    ref_base.weight.data = dequantize(q)
    a, b = LoRALinear(q, 8, 16), LoRALinear(ref_base, 8, 16)
    nn.init.normal_(a.lora_B.weight)
    b.lora_A.load_state_dict(a.lora_A.state_dict())
    b.lora_B.load_state_dict(a.lora_B.state_dict())
    x = torch.randn(5, 64, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    ya.sum().backward()
    assert a.lora_A.weight.grad is not None and a.lora_B.weight.grad is not None
    with pytest.raises(TypeError, match="quantized|Int8Linear"):
        a.merge()


def test_int8_model_with_lora_matches_dequantized_model():
    from model.quant import dequantize, quantize_linear
    ref = tiny_model()
    q = tiny_model()
    for (name, mod), (_, rmod) in zip(list(q.named_modules()), list(ref.named_modules())):
        for proj in SEVEN:
            child = getattr(mod, proj, None)
            if isinstance(child, nn.Linear):
                layer = quantize_linear(child.weight.data, "int8")
                setattr(mod, proj, layer)
                getattr(rmod, proj).weight.data = dequantize(layer)
    apply_lora(q, r=4, alpha=8, dropout=0.0)
    apply_lora(ref, r=4, alpha=8, dropout=0.0)
    randomize_lora(q)
    randomize_lora(ref)
    with torch.no_grad():
        torch.testing.assert_close(q(ids()), ref(ids()), atol=1e-5, rtol=1e-5)
    assert "int8" in repr(q.model.layers[0].mlp.down_proj.base_layer)


# ---------------------------------------------------------------------------- apply_lora

def test_apply_lora_targets_and_errors():
    model = tiny_model()
    apply_lora(model, targets=("q_proj", "v_proj"), r=2, alpha=4)
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)}) == ["q_proj", "v_proj"]
    assert len(lora_modules(model)) == 4 and model.lm_head.__class__ is nn.Linear
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, targets=("q_proj",))
    fresh = tiny_model()
    with pytest.raises(ValueError, match=r"\['qproj'\]"):
        apply_lora(fresh, targets=("k_proj", "qproj"))
    assert not lora_modules(fresh)  # a bad target leaves the model untouched
    def mlp0(module, name):
        return isinstance(module, nn.Linear) and name.startswith("model.layers.0.mlp.")
    only0 = apply_lora(tiny_model(), r=2, alpha=2, filter_fn=mlp0)
    assert list(lora_modules(only0)) == [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]


def test_param_summary_llama3_8b_r32_on_meta():
    with torch.device("meta"):
        model = Llama(LlamaConfig())  # the Llama-3-8B shape
        apply_lora(model, r=32, alpha=64)
    trainable, total = count_params(model)
    assert trainable == 83_886_080
    assert total == 8_030_261_248 + trainable
    assert param_summary(model).startswith("trainable 83,886,080 / total 8,114,147,328 (1.03")


def test_param_summary_counts_quantized_weights_logically():
    from model.quant import quantize_linear
    w = torch.randn(32, 64)
    m = nn.Sequential(quantize_linear(w, "int8"), quantize_linear(w, "nf4"))
    assert count_params(m) == (0, 2 * 32 * 64)
    m[0] = LoRALinear(m[0], 4, 4)
    assert count_params(m) == (4 * (64 + 32), 2 * 32 * 64 + 4 * (64 + 32))


# ---------------------------------------------------------------------------- adapter files

def test_save_load_roundtrip_and_file_contents(tmp_path):
    model = randomize_lora(apply_lora(tiny_model(), r=4, alpha=8, dropout=0.05, rslora=True))
    x = ids()
    with torch.no_grad():
        ref = model(x)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny", record={"note": "hi"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", FILE]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 2
    for k, t in tensors.items():
        assert k.startswith("base_model.model.model.layers.")
        assert k.endswith((".lora_A.weight", ".lora_B.weight"))
        assert t.dtype == torch.float32 and t.is_contiguous()
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (4, 8, 0.05, True)
    assert sorted(cfg["target_modules"]) == sorted(SEVEN) and cfg["base_model_name_or_path"] == "tiny"
    assert cfg["modules_to_save"] is None and cfg["fan_in_fan_out"] is False
    assert read_record(tmp_path / "adapter_model.safetensors") == {"note": "hi"}  # the header's "run"
    assert read_adapter_config(tmp_path / "adapter_model.safetensors")["r"] == 4

    fresh = tiny_model()  # no LoRA yet: load_adapter applies it from the config
    load_adapter(fresh, tmp_path / "adapter_model.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    assert lora_modules(fresh)["model.layers.0.mlp.up_proj"].dropout == 0.05
    again = apply_lora(tiny_model(), r=4, alpha=8, rslora=True)  # LoRA present: loads into it
    load_adapter(again, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), ref)


def test_partial_targets_roundtrip_with_full_names(tmp_path):
    model = randomize_lora(apply_lora(tiny_model(), r=2, alpha=2,
                                      filter_fn=lambda m, n: n == "model.layers.1.self_attn.v_proj"))
    save_adapter(model, tmp_path)
    assert read_adapter_config(tmp_path)["target_modules"] == ["model.layers.1.self_attn.v_proj"]
    fresh = load_adapter(tiny_model(), tmp_path)
    assert list(lora_modules(fresh)) == ["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        assert torch.equal(fresh(ids()), model(ids()))


def test_save_is_atomic(tmp_path, monkeypatch):
    import lora.io
    model = apply_lora(tiny_model(), r=2, alpha=2)
    save_adapter(model, tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_lora(model)

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(lora.io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", FILE]


@pytest.fixture()
def saved(tmp_path):
    d = tmp_path / "adapter"
    save_adapter(randomize_lora(apply_lora(tiny_model(), r=4, alpha=8)), d)
    return d


def _rewrite(d, fn):
    f = d / "adapter_model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f)


def test_refuses_wrong_rank(saved):
    with pytest.raises(AdapterError, match="rank mismatch: adapter r=4, model's .*q_proj has r=8"):
        load_adapter(apply_lora(tiny_model(), r=8, alpha=8), saved)
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps(dict(cfg, r=2)))
    with pytest.raises(AdapterError, match=r"adapter_config.json and the header of .* disagree on r"):
        load_adapter(tiny_model(), saved)
    _rewrite(saved, lambda t: None)  # no config in the header, as PEFT writes it: the shapes tell
    with pytest.raises(AdapterError, match=r"rank mismatch at base_model\.model\.model\.layers\.0\..*"
                                           r"rank 4, config/model r=2"):
        load_adapter(tiny_model(), saved)


def test_refuses_missing_and_extra_keys(saved):
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    _rewrite(saved, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=f"missing key {key}"):
        load_adapter(tiny_model(), saved)
    head = "base_model.model.lm_head.weight"
    _rewrite(saved, lambda t: t.update({key: torch.zeros(64, 4), head: torch.ones(3)}))
    with pytest.raises(AdapterError, match="unexpected key base_model.model.lm_head.weight"):
        load_adapter(tiny_model(), saved)


def test_refuses_another_models_shapes(saved):
    other = tiny_model(hidden_size=32, intermediate_size=64)
    with pytest.raises(AdapterError, match=r"shape mismatch at base_model\.model\..*another model"):
        load_adapter(other, saved)
    assert not lora_modules(other)  # a refused adapter leaves the model as it was
    fewer = tiny_model(num_hidden_layers=1)
    with pytest.raises(AdapterError, match=r"unexpected key base_model\.model\.model\.layers\.1\."):
        load_adapter(fewer, saved)


def test_refuses_pickles_and_bad_configs(saved, tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(AdapterError, match="adapter_model.bin: pickle"):
        load_adapter(tiny_model(), tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="no adapter_model.safetensors .found adapter_model.bin"):
        load_adapter(tiny_model(), tmp_path)
    cfg_path = saved / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for bad, msg in [({"peft_type": "IA3"}, "peft_type is 'IA3'"), ({"use_dora": True}, "use_dora=True"),
                     ({"bias": "all"}, "bias='all'"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")]:
        cfg_path.write_text(json.dumps(dict(cfg, **bad)))
        with pytest.raises(AdapterError, match=msg):
            load_adapter(tiny_model(), saved)
    cfg_path.write_text(json.dumps(cfg))
    weights = (saved / "adapter_model.safetensors").read_bytes()
    for broken in (b"garbage", weights[:len(weights) // 2]):  # not safetensors; a cut download
        (saved / "adapter_model.safetensors").write_bytes(broken)
        with pytest.raises(AdapterError, match="adapter_model.safetensors: unreadable safetensors file"):
            load_adapter(tiny_model(), saved)
    (saved / "adapter_model.safetensors").write_bytes(weights)
    cfg_path.unlink()
    load_adapter(tiny_model(), saved)  # the file's header carries the config
    _rewrite(saved, lambda t: None)  # a file without it (PEFT's) and no side config
    with pytest.raises(AdapterError, match="no adapter config next to the adapter weights, and none in the header"):
        load_adapter(tiny_model(), saved)
    with pytest.raises(AdapterError, match="nothing.safetensors: no such file"):
        read_adapter_config(saved / "nothing.safetensors")


# ---------------------------------------------------------------------------- merge CLI

@pytest.fixture()
def base_and_adapter(tmp_path):
    from tests.tiny import make_tiny_model_dir
    base = make_tiny_model_dir(tmp_path / "base")
    (base / "original").mkdir()
    (base / "original" / "tokenizer.model").write_text("tok")
    (base / "original" / "consolidated.00.pth").write_text("unmerged weights")
    from model.load import load_model
    model = randomize_lora(apply_lora(load_model(base, "fp32"), r=4, alpha=8, dropout=0.0))
    save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter", model.eval()


def _logits(model):
    with torch.no_grad():
        return model(ids(t=17) % 200)


def test_merge_cli_fp32_exact_and_sharded(base_and_adapter, tmp_path, capsys):
    from lora.merge import main
    from model.load import load_model
    base, adapter, model = base_and_adapter
    out = tmp_path / "merged"
    assert main(["--model", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32",
                 "--max-shard-size", "100KB"]) == 0
    log = capsys.readouterr().out
    assert "merged 14 LoRA weights" in log and "original checkpoint weights" in log
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "original" / "tokenizer.model").is_file()
    assert not (out / "original" / "consolidated.00.pth").exists()  # unmerged weights are not copied
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    merged = load_model(out, "fp32").eval()
    assert not lora_modules(merged)
    torch.testing.assert_close(_logits(merged), _logits(model), atol=1e-5, rtol=1e-5)


def test_merge_cli_bf16(base_and_adapter, tmp_path):
    from lora.merge import main
    from model.load import load_model
    base, adapter, model = base_and_adapter
    out = tmp_path / "merged"
    assert main(["--model", str(base), "--adapter", str(adapter / "adapter_model.safetensors"),
                 "--out", str(out)]) == 0
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    ref, got = _logits(model), _logits(load_model(out, "fp32").eval())
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()  # bf16 storage: ~3 significant digits


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_merge_cli_quantized_merges_into_dequantized_weights(base_and_adapter, tmp_path, capsys, precision):
    # --precision int8 reproduces the int8 model + adapter exactly, stored in float.
    from lora.merge import main
    from model.load import load_model
    base, adapter, _ = base_and_adapter
    out = tmp_path / "merged"
    assert main(["--model", str(base), "--adapter", str(adapter), "--out", str(out),
                 "--precision", precision, "--dtype", "fp32"]) == 0
    assert f"into the {precision} weights" in capsys.readouterr().out
    q = load_adapter(load_model(base, precision, dtype=torch.float32), adapter).eval()
    torch.testing.assert_close(_logits(load_model(out, "fp32").eval()), _logits(q), atol=1e-5, rtol=1e-5)


def test_merge_cli_errors_exit_2(base_and_adapter, tmp_path, capsys):
    from common.errors import cli_entry
    from lora.merge import main
    base, adapter, _ = base_and_adapter
    other = tmp_path / "other"
    save_adapter(apply_lora(tiny_model(hidden_size=32, intermediate_size=64), r=4, alpha=8), other)
    cases = [
        (["--adapter", str(other)], "shape mismatch at model.layers.0."),
        (["--adapter", str(tmp_path / "nope")], "nope: no such file"),
        (["--adapter", str(adapter), "--out", str(base)], "is the base model folder"),
    ]
    for extra, msg in cases:
        argv = ["--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o")] + extra
        with pytest.raises(SystemExit) as exited:  # as merge.py runs it
            cli_entry(lambda: main(argv))
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- dropout masks (lora/lora.py)

def test_dropout_bits_rate_scale_mean_and_grad():
    from lora.lora import dropout_bits
    x = torch.ones(1 << 20, requires_grad=True)
    torch.manual_seed(0)
    y = dropout_bits(x, 0.1)
    k = round(0.1 * 65536)
    kept = y != 0
    rate = 1 - kept.float().mean().item()
    assert abs(rate - k / 65536) < 5 * (0.1 * 0.9 / x.numel()) ** 0.5  # within 5 sigma of p
    assert torch.all(y[kept] == 65536 / (65536 - k))  # kept elements scaled so E[y] = x
    assert abs(y.mean().item() - 1) < 2e-3
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x = mask * scale
    # The mask is a function of the seed: the same seed draws it again, another does not.
    torch.manual_seed(0)
    assert torch.equal(dropout_bits(x.detach(), 0.1), y.detach())
    assert not torch.equal(dropout_bits(x.detach(), 0.1), y.detach())
    # Four elements per 64-bit word: neighbours are not copies of each other.
    z = dropout_bits(torch.ones(4, 4096), 0.5)
    assert not torch.equal(z[:, 0::4] != 0, z[:, 1::4] != 0)


def test_dropout_mask_switch(monkeypatch):
    from lora.lora import apply_dropout, dropout_bits, dropout_masks
    x = torch.randn(8, 33)
    assert apply_dropout(x, 0.1, training=False) is x and apply_dropout(x, 0.0) is x
    torch.manual_seed(3)
    fast = apply_dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(fast, dropout_bits(x, 0.3))  # CPU default: the 16-bit draws
    with dropout_masks("torch"):
        torch.manual_seed(3)
        theirs = apply_dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(theirs, torch.nn.functional.dropout(x, 0.3))  # torch's (PEFT's) masks
    monkeypatch.setenv("DROPOUT_MASKS", "torch")  # the environment's switch, as train.py's runs read it
    torch.manual_seed(3)
    assert torch.equal(apply_dropout(x, 0.3), theirs)
    with kernels.backend("torch"):  # the kernels switch is not the mask switch
        monkeypatch.delenv("DROPOUT_MASKS")
        torch.manual_seed(3)
        assert torch.equal(apply_dropout(x, 0.3), fast)
    with pytest.raises(ValueError, match="0, 1"):
        dropout_bits(x, 1.0)
