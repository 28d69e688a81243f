"""Our Llama against transformers' LlamaForCausalLM on the same random weights (CPU, fp32)."""
import pytest
import torch

from model.config import ConfigError, LlamaConfig
from model.llama import Llama

transformers = pytest.importorskip("transformers")


def hf_pair(cfg: LlamaConfig, seed=0):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict())).eval()
    ours = Llama(cfg).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing
    assert set(unexpected) <= {"lm_head.weight"}  # tied models: HF lists the shared head too
    return hf, ours


CONFIGS = {
    "gqa_llama3_scaling": LlamaConfig.tiny(),
    "tied": LlamaConfig.tiny(tie_word_embeddings=True, rope_scaling=None, rope_theta=100000.0),
    "mha_llama2": LlamaConfig.tiny(num_key_value_heads=4, rope_scaling=None, rope_theta=10000.0,
                                   rms_norm_eps=1e-6),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(name):
    cfg = CONFIGS[name]
    hf, ours = hf_pair(cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_long_positions_use_llama3_scaling():
    # Past original_max_position_embeddings (64 in tiny) the scaled frequencies matter.
    cfg = LlamaConfig.tiny()
    hf, ours = hf_pair(cfg)
    ids = torch.randint(3, cfg.vocab_size, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_unpadded_logits(side):
    cfg = LlamaConfig.tiny()
    hf, ours = hf_pair(cfg)
    short = torch.randint(3, cfg.vocab_size, (1, 11))
    full = torch.randint(3, cfg.vocab_size, (1, 19))
    pad = torch.zeros(1, 8, dtype=torch.long)
    padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    ids = torch.cat([padded, full])
    mask = ids.new_ones(ids.shape, dtype=torch.bool)
    if side == "left":
        mask[0, :8] = False
    else:
        mask[0, 11:] = False
    with torch.no_grad():
        out = ours(ids, mask)
        ref_short = hf(short).logits[0]
        ref_full = hf(full).logits[0]
        # transformers itself on the padded batch, positions given explicitly
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ref_batch = hf(ids, attention_mask=mask.long(), position_ids=pos).logits
    real = out[0][mask[0]]
    torch.testing.assert_close(real, ref_short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(real, ref_batch[0][mask[0]], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_logits_at_selects_one_position_per_row():
    cfg = LlamaConfig.tiny()
    _, ours = hf_pair(cfg)
    ids = torch.randint(3, cfg.vocab_size, (3, 15))
    at = torch.tensor([14, 3, 7])
    with torch.no_grad():
        full = ours(ids)
        picked = ours(ids, logits_at=at)
    assert picked.shape == (3, cfg.vocab_size)
    torch.testing.assert_close(picked, full[torch.arange(3), at])


def test_grad_checkpointing_gives_same_grads():
    cfg = LlamaConfig.tiny()
    _, ours = hf_pair(cfg)
    ours.train()
    ids = torch.randint(3, cfg.vocab_size, (2, 9))
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.grad_checkpointing = ckpt
        ours(ids).float().logsumexp(-1).mean().backward()
        grads.append(ours.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_meta_build_has_no_buffers():
    with torch.device("meta"):
        m = Llama(LlamaConfig.tiny())
    assert list(m.buffers()) == []


def test_config_round_trip_and_errors(tmp_path):
    cfg = LlamaConfig.tiny(tie_word_embeddings=True)
    back = LlamaConfig.from_dict(cfg.to_hf_dict())
    assert back.to_hf_dict() == cfg.to_hf_dict()
    with pytest.raises(ConfigError, match="model_type 'mistral'"):
        LlamaConfig.from_dict({**cfg.to_hf_dict(), "model_type": "mistral"})
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        LlamaConfig.from_dict({**cfg.to_hf_dict(), "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ConfigError, match="no config.json"):
        LlamaConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_hf_config(tmp_path)


def test_llama31_8b_config_shapes():
    raw = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    cfg = LlamaConfig.from_dict(raw)
    with torch.device("meta"):
        m = Llama(cfg)
    assert sum(p.numel() for p in m.parameters()) == 8_030_261_248


def test_transformers5_rope_parameters_are_read(tmp_path):
    # transformers >= 5 saves rope_theta and the llama3 scaling under "rope_parameters".
    cfg = LlamaConfig.tiny()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict()))
    hf.save_pretrained(tmp_path)
    back = LlamaConfig.from_hf_config(tmp_path)
    assert back.rope_theta == cfg.rope_theta
    assert back.rope_type == "llama3" and back.rope_scaling["factor"] == 8.0
