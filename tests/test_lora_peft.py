"""Our adapters against PEFT's, and our merged folder against transformers (CPU, fp32, tiny).

Both directions, plain LoRA and rsLoRA, with nonzero random B so the adapter really moves the
logits; dropout is on in the configs and off (eval mode) for every comparison.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from lora.inject import apply_lora, lora_modules
from lora.io import load_adapter, read_adapter_config, save_adapter
from model.config import LlamaConfig
from model.llama import Llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# peft calls transformers' deprecated is_gradient_checkpointing: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-5


def hf_and_ours(seed=0):
    cfg = LlamaConfig.tiny()  # GQA + llama3 RoPE scaling
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict())).eval()
    ours = Llama(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def randomize(named_weights, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in sorted(named_weights):
            w.copy_(torch.randn(w.shape, generator=g) * std)


def ids():
    return torch.randint(3, 256, (2, 19), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        out = model(ids())
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_our_adapter_loads_in_peft(tmp_path, rslora):
    hf, ours = hf_and_ours()
    apply_lora(ours, r=4, alpha=8, dropout=0.1, rslora=rslora)
    ours.eval()
    randomize((n, p) for n, p in ours.named_parameters() if "lora_" in n)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    before = logits(hf)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert pm.peft_config["default"].use_rslora is rslora and pm.peft_config["default"].r == 4
    ref = logits(pm)
    assert (ref - before).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(logits(ours), ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_adapter_loads_in_ours(tmp_path, rslora):
    hf, ours = hf_and_ours()
    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=SEVEN, use_rslora=rslora,
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    randomize((n, p) for n, p in pm.named_parameters() if "lora_" in n)
    pm.eval()
    pm.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)  # no LoRA yet: applied from PEFT's adapter_config.json
    assert len(lora_modules(ours)) == 14 and not ours.training
    m = ours.model.layers[0].self_attn.q_proj
    assert m.scaling == (16 / 2 if rslora else 16 / 4) and m.dropout == 0.1
    torch.testing.assert_close(logits(ours), logits(pm), atol=ATOL, rtol=ATOL)


def test_peft_regex_and_all_linear_targets(tmp_path):
    hf, ours = hf_and_ours()
    regex = r"model\.layers\.1\.self_attn\.(q|v)_proj"
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=regex))
    randomize((n, p) for n, p in pm.named_parameters() if "lora_" in n)
    pm.eval().save_pretrained(tmp_path / "regex")
    load_adapter(ours, tmp_path / "regex")
    assert list(lora_modules(ours)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    torch.testing.assert_close(logits(ours), logits(pm), atol=ATOL, rtol=ATOL)

    hf, ours = hf_and_ours()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    randomize((n, p) for n, p in pm.named_parameters() if "lora_" in n)
    pm.eval().save_pretrained(tmp_path / "all")
    cfg_file = tmp_path / "all" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    assert isinstance(cfg["target_modules"], list)  # PEFT 0.21 saves "all-linear" expanded
    load_adapter(ours, tmp_path / "all")
    assert len(lora_modules(ours)) == 14
    torch.testing.assert_close(logits(ours), logits(pm), atol=ATOL, rtol=ATOL)
    # The literal "all-linear" (older PEFT wrote it, and hand-made configs do): every linear but the head.
    cfg_file.write_text(json.dumps(dict(cfg, target_modules="all-linear")))
    _, ours = hf_and_ours()
    load_adapter(ours, tmp_path / "all")
    assert len(lora_modules(ours)) == 14 and "lm_head" not in lora_modules(ours)
    torch.testing.assert_close(logits(ours), logits(pm), atol=ATOL, rtol=ATOL)


def test_partial_adapter_loads_in_peft(tmp_path):
    hf, ours = hf_and_ours()
    apply_lora(ours, r=2, alpha=4, filter_fn=lambda m, n: n.startswith("model.layers.0.mlp."))
    ours.eval()
    randomize((n, p) for n, p in ours.named_parameters() if "lora_" in n)
    save_adapter(ours, tmp_path)
    assert read_adapter_config(tmp_path)["target_modules"] == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert sum("lora_A" in n for n, _ in pm.named_parameters()) == 3
    torch.testing.assert_close(logits(ours), logits(pm), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merged_folder_loads_in_transformers_and_ours(tmp_path, dtype):
    from lora.merge import main
    from model.load import load_model
    hf, ours = hf_and_ours()
    base = tmp_path / "base"
    hf.save_pretrained(base)
    # transformers 5 writes `rope_parameters`; keep the classic `rope_scaling` form that Hub
    # Llama-3 checkpoints use (the merged folder copies this config.json).
    (base / "config.json").write_text(json.dumps(LlamaConfig.tiny().to_hf_dict()))
    apply_lora(ours, r=4, alpha=8, rslora=True)
    ours.eval()
    randomize((n, p) for n, p in ours.named_parameters() if "lora_" in n)
    save_adapter(ours, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--dtype", dtype, "--max-shard-size", "200KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    want_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == want_dtype
    ref = logits(ours)
    merged_hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    merged_ours = load_model(out, "fp32").eval()
    for got in (logits(merged_hf), logits(merged_ours)):
        if dtype == "fp32":
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)
        else:  # every weight rounded to bf16 (8-bit mantissa): a loose bound at the logits' scale
            assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    if dtype == "bf16":  # the exact check: each stored tensor is the fp32 merge rounded once to bf16
        for m in lora_modules(ours).values():
            m.merge()
        want = {k.replace(".base_layer", ""): v for k, v in ours.state_dict().items() if "lora_" not in k}
        got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
        assert got.keys() == want.keys()
        for k, v in got.items():
            assert v.dtype == torch.bfloat16 and torch.equal(v, want[k].to(torch.bfloat16)), k
    # transformers' PEFT merge agrees with ours
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload().eval()
    torch.testing.assert_close(logits(pm), ref, atol=ATOL, rtol=ATOL)
