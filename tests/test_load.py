"""load_model against transformers' own save_pretrained folders (CPU, tiny configs)."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from model.config import LlamaConfig
from model.load import LoadError, load_model
from model.quant import Int8Linear, NF4Linear

transformers = pytest.importorskip("transformers")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def hf_model(cfg: LlamaConfig, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict())).eval()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A random tiny Llama saved by transformers in several shards + model.safetensors.index.json."""
    hf = hf_model(LlamaConfig.tiny())
    d = tmp_path_factory.mktemp("sharded")
    hf.save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    return hf, d


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(3)
    return torch.randint(3, 256, (2, 23))


@pytest.fixture(scope="module")
def fp32_logits(sharded, ids):
    with torch.no_grad():
        return load_model(sharded[1], precision="fp32")(ids)


def write_folder(d, tensors: dict, cfg: LlamaConfig):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    return d


def test_fp32_sharded_equals_transformers(sharded, ids):
    hf, d = sharded
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = load_model(d, precision="fp32")
    params = list(model.parameters())
    assert not any(p.is_meta or p.requires_grad for p in params)
    assert {p.dtype for p in params} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_int8_close_to_fp32(sharded, ids, fp32_logits):
    _, d = sharded
    model = load_model(d, precision="int8", dtype=torch.float32)
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, Int8Linear) and q.weight.dtype == torch.int8 and q.SCB.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        # Per-row absmax int8 on every projection of a random model: ~0.6% relative logit error.
        assert rel(model(ids), fp32_logits) < 0.02
    # Default compute dtype for int8 is bf16 for everything that is not a projection.
    bf = load_model(d, precision="int8")
    assert bf.model.embed_tokens.weight.dtype == bf.lm_head.weight.dtype == torch.bfloat16
    assert bf.model.norm.weight.dtype == torch.bfloat16
    sd = bf.state_dict()
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert sd["model.layers.0.self_attn.q_proj.SCB"].dtype == torch.float32


def test_nf4_and_bf16_load_and_run(sharded, ids, fp32_logits):
    _, d = sharded
    ref = fp32_logits
    with torch.no_grad():
        nf4 = load_model(d, precision="nf4", dtype=torch.float32)
        assert isinstance(nf4.model.layers[0].self_attn.k_proj, NF4Linear)
        assert rel(nf4(ids), ref) < 0.3  # 4-bit on random weights: ~10%
        bf16 = load_model(d, precision="bf16")
        assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        out = bf16(ids)
        assert out.dtype == torch.bfloat16 and rel(out.float(), ref) < 0.02


def test_tied_single_file_skips_inv_freq_and_head_copy(tmp_path, ids):
    cfg = LlamaConfig.tiny(tie_word_embeddings=True, rope_scaling=None)
    hf = hf_model(cfg)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    # What older exporters wrote: RoPE buffers per layer and a copy of the tied head.
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    d = write_folder(tmp_path / "tied", sd, cfg)
    model = load_model(d, precision="fp32")
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_projection_biases(tmp_path, ids, precision):
    cfg = LlamaConfig.tiny(attention_bias=True, mlp_bias=True)
    hf = hf_model(cfg)
    with torch.no_grad():  # HF zero-initialises biases; make them matter
        for n, p in hf.named_parameters():
            if n.endswith(".bias"):
                p.normal_()
    d = write_folder(tmp_path / "bias", hf.state_dict(), cfg)
    model = load_model(d, precision=precision, dtype=torch.float32 if precision == "int8" else None)
    assert model.model.layers[1].self_attn.v_proj.bias.dtype == torch.float32
    with torch.no_grad():
        out, ref = model(ids), hf(ids).logits
    if precision == "fp32":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        assert rel(out, ref) < 0.02


@pytest.fixture(scope="module")
def tiny_sd():
    return hf_model(LlamaConfig.tiny()).state_dict()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.00.pth"])
def test_refuses_pickle(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig.tiny().to_hf_dict()))
    (tmp_path / name).write_bytes(b"never read")
    msg = f"refusing to load {tmp_path / name}: pickle checkpoints can run code; convert to safetensors"
    for path in (tmp_path, tmp_path / name):  # the folder, or the file itself
        with pytest.raises(LoadError, match=re.escape(msg)):
            load_model(path)


def test_missing_key(tmp_path, tiny_sd):
    sd = {k: v for k, v in tiny_sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    d = write_folder(tmp_path / "m", sd, LlamaConfig.tiny())
    with pytest.raises(LoadError, match=re.escape(
            f"missing key model.layers.1.mlp.up_proj.weight: expected in {d / 'model.safetensors'}")):
        load_model(d)


def test_missing_key_names_its_shard(tmp_path, sharded):
    _, src = sharded
    d = tmp_path / "shards"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    shard = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    from safetensors.torch import load_file
    tensors = load_file(str(d / shard))
    del tensors["model.norm.weight"]
    save_file(tensors, str(d / shard))
    with pytest.raises(LoadError, match=re.escape(
            f"missing key model.norm.weight: expected in {d / shard} (per model.safetensors.index.json)")):
        load_model(d)


def test_unexpected_key(tmp_path, tiny_sd):
    sd = dict(tiny_sd, **{"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)})
    d = write_folder(tmp_path / "u", sd, LlamaConfig.tiny())
    with pytest.raises(LoadError, match=re.escape(
            f"{d / 'model.safetensors'}: unexpected key model.layers.0.mlp.extra_proj.weight")):
        load_model(d)


def test_wrong_shape(tmp_path, tiny_sd):
    sd = dict(tiny_sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    d = write_folder(tmp_path / "s", sd, LlamaConfig.tiny())
    with pytest.raises(LoadError, match=re.escape(
            "model.layers.0.self_attn.k_proj.weight has shape (64, 64), expected (32, 64)")):
        load_model(d)


def test_bad_precision_and_empty_folder(tmp_path):
    with pytest.raises(LoadError, match="precision 'int4'"):
        load_model(tmp_path, precision="int4")
    with pytest.raises(LoadError, match="conflicts with precision 'bf16'"):
        load_model(tmp_path, precision="bf16", dtype=torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig.tiny().to_hf_dict()))
    with pytest.raises(LoadError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)


def test_float_load_does_not_import_bitsandbytes(sharded):
    # bitsandbytes costs seconds of start-up; an fp32 / bf16 run (the CPU default) must not pay it.
    import subprocess
    import sys
    from pathlib import Path
    folder = sharded[1]
    code = ("import sys, train, predict\n"
            "from model.load import load_model\n"
            f"load_model({str(folder)!r}, 'fp32'); load_model({str(folder)!r}, 'bf16')\n"
            "assert 'bitsandbytes' not in sys.modules, 'imported'\n"
            f"load_model({str(folder)!r}, 'int8')\n"
            "assert 'bitsandbytes' in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
