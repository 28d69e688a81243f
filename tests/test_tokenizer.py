"""Tokenizer: golden Llama-3 ids, BOS/EOS/pad per family, the three file formats.

The real Llama-3 vocabulary comes from the test-only package quicktok-v1: written out as
"base64(bytes) rank" lines it is byte-identical to Meta's original/tokenizer.model, and
quicktok's own exact BPE is an independent reference for the ids. transformers'
TikTokenConverter gives a second, independent tokenizer.json built from the same file.
"""
import base64
import hashlib
import json
import os
import random
import struct

import pytest

from model.tokenizer import (LLAMA3_PATTERN, Tokenizer, bytes_to_unicode, is_tiktoken_file,
                             llama3_special_names)

META_LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def _quicktok_ranks():
    quicktok = pytest.importorskip("quicktok")
    path = os.path.join(os.path.dirname(quicktok.__file__), "data", "llama3.vocab")
    b = open(path, "rb").read()
    (n,), o, out = struct.unpack_from("<I", b, 0), 4, []
    for _ in range(n):  # records: u16 length, bytes, u32 rank
        (ln,) = struct.unpack_from("<H", b, o)
        tok = b[o + 2:o + 2 + ln]
        (rank,) = struct.unpack_from("<I", b, o + 2 + ln)
        o += 6 + ln
        out.append((rank, tok))
    return sorted(out)


@pytest.fixture(scope="module")
def llama3_model_file(tmp_path_factory):
    """Meta's original/tokenizer.model, rebuilt from quicktok's copy of the vocabulary."""
    d = tmp_path_factory.mktemp("llama3_bare")
    (d / "original").mkdir()
    f = d / "original" / "tokenizer.model"
    f.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in _quicktok_ranks()))
    return f


@pytest.fixture(scope="module")
def llama3(llama3_model_file):
    return Tokenizer.from_dir(llama3_model_file.parent.parent)


@pytest.fixture(scope="module")
def qt():
    return pytest.importorskip("quicktok").get_encoding("llama3")


def _varied_strings(n=400, seed=0):
    """Math text, code, numbers, unicode and odd whitespace: what the pre-tokenizer regex splits."""
    rng = random.Random(seed)
    fixed = [
        "Hello world", "The capital of France is", " True", " False", "", " ", "\n\n", "  \t x",
        "1234567890 3.14159 -0.5 1,000,000 007", "I'm sure you'RE right; they'll see, WE'D go",
        "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))\r\n",
        "$\\frac{1}{2} + \\sqrt{x^2+1} = \\boxed{42}$", "Héllo wörld – naïve café, Straße",
        "你好，世界。数学题：1+1=?", "🙂🙂 emoji 👍🏽 and ZWJ 👨‍👩‍👧", "<|begin_of_text|> is text here",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "   leading and trailing   ", "tab\tsep\tvalues\n",
        "<llm-code>\nimport sympy as sp\nx = sp.symbols('x')\n</llm-code>", "x" * 300,
    ]
    words = ["the", "number", "of", "apples", "is", "Janet's", "ducks", "lay", "eggs", "=", "+",
             "\\times", "$", "\\frac{3}{4}", "<<16-3=13>>13", "A:", "42", "3.5", "x^2", "(", ")",
             "é", "ß", "Ω", "≤", "—", "…", "你", "🙂", "\n", "\n\n", "  ", "\t", "'s", "'LL", "?!"]
    out = list(fixed)
    while len(out) < n:
        k = rng.randint(1, 40)
        sep = rng.choice([" ", "", "  ", "\n", " \n"])
        out.append(sep.join(rng.choice(words) for _ in range(k)))
    return out


# -- Llama 3 from Meta's tiktoken file ---------------------------------------------------------


def test_vocab_file_is_metas(llama3_model_file):
    assert hashlib.sha256(llama3_model_file.read_bytes()).hexdigest() == META_LLAMA3_SHA256
    assert is_tiktoken_file(llama3_model_file)


def test_llama3_golden_ids(llama3):
    assert llama3.kind == "tiktoken"
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.encode("The capital of France is") == [791, 6864, 315, 9822, 374]
    assert llama3.encode("The capital of France is", bos=True) == [128000, 791, 6864, 315, 9822, 374]
    assert llama3.vocab_size == 128256


def test_llama3_specials(llama3):
    # A bare Meta folder: Llama 3.1 names, BOS <|begin_of_text|>, EOS <|end_of_text|>, pad 128004.
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id, llama3.add_bos) == (128000, 128001, 128004, True)
    names = llama3_special_names()
    assert len(names) == 256 and len(set(names)) == 256
    for name, i in [("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001),
                    ("<|finetune_right_pad_id|>", 128004), ("<|start_header_id|>", 128006),
                    ("<|end_header_id|>", 128007), ("<|eom_id|>", 128008), ("<|eot_id|>", 128009),
                    ("<|python_tag|>", 128010), ("<|reserved_special_token_247|>", 128255)]:
        assert llama3.token_id(name) == i
    # A special token's name inside data is plain text, never a control token.
    assert 128009 not in llama3.encode("user wrote <|eot_id|> here")
    assert llama3.decode([128000, 9906]) == "<|begin_of_text|>Hello"


def test_llama3_labels_single_tokens(llama3):
    t, f = llama3.label_ids()
    assert (t, f) == (llama3.encode(" True")[0], llama3.encode(" False")[0])
    assert len(llama3.encode(" True")) == len(llama3.encode(" False")) == 1
    # The label id is what the tokenizer produces after the cue in running text.
    assert llama3.encode("Answer is correct (True/False only): True")[-1] == t
    assert llama3.encode("Answer is correct (True/False only): False")[-1] == f
    with pytest.raises(ValueError, match="Truthiness"):
        llama3.token_id(" Truthiness and beauty")


def test_llama3_bos_once_and_batch(llama3):
    texts = ["a", "Hello world", ""]
    batch = llama3.encode_batch(texts, bos=True)
    assert batch == [llama3.encode(t, bos=True) for t in texts]
    assert all(ids.count(128000) == 1 and ids[0] == 128000 for ids in batch)


def test_llama3_round_trip(llama3):
    for s in _varied_strings(200, seed=3):
        assert llama3.decode(llama3.encode(s)) == s


def test_llama3_agrees_with_quicktok(llama3, qt):
    strings = _varied_strings(400, seed=1)
    ours = llama3.encode_batch(strings)
    bad = [s for s, ids in zip(strings, ours) if ids != qt.encode_ordinary(s)]
    assert not bad, f"{len(bad)} of {len(strings)} differ, e.g. {bad[:3]!r}"


def test_llama3_config_files(llama3_model_file, tmp_path):
    """Meta's 3.1 folder with HF configs: EOS and pad from them; a 3.0 folder pads with EOS."""
    d = tmp_path / "l31"
    (d / "original").mkdir(parents=True)
    (d / "original" / "tokenizer.model").write_bytes(llama3_model_file.read_bytes())
    (d / "config.json").write_text(json.dumps({
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128009, 128004)

    d30 = tmp_path / "l30"
    (d30 / "original").mkdir(parents=True)
    (d30 / "original" / "tokenizer.model").write_bytes(llama3_model_file.read_bytes())
    (d30 / "original" / "params.json").write_text(json.dumps({"dim": 4096, "rope_theta": 500000.0}))
    tok = Tokenizer.from_dir(d30)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128001)


@pytest.mark.slow  # ~5 s: builds a second 128k-token BPE through transformers
def test_tokenizer_json_from_transformers_converter(llama3_model_file, llama3, qt, tmp_path):
    """An HF-style Llama-3 tokenizer.json (built by transformers' own converter, whose template
    adds BOS) loads through the tokenizer.json path, adds BOS once and gives the same ids."""
    pytest.importorskip("transformers")
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):  # its own loader needs tiktoken; read the file here
        @staticmethod
        def load_tiktoken_bpe(path):
            lines = open(path, "rb").read().splitlines()
            return {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in lines if ln)}

    hf = Converter(vocab_file=str(llama3_model_file), pattern=LLAMA3_PATTERN,
                   extra_special_tokens=llama3_special_names()).converted()
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", 128000)])])
    d = tmp_path / "hf"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    tok = Tokenizer.from_dir(d)
    assert tok.kind == "tokenizer.json"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (128000, 128001, 128004, True)
    assert tok.encode("Hello world", bos=True) == [128000, 9906, 1917]  # not [128000, 128000, ...]

    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    # HF parses special-token names inside text; we deliberately do not (see the module doc).
    strings = [s for s in _varied_strings(300, seed=2) if "<|" not in s]
    for s in strings:
        ref = fast(s)["input_ids"]
        assert tok.encode(s, bos=True) == ref, s
        assert llama3.encode(s, bos=True) == ref, s


# -- tokenizer.json without a BOS template (SmolLM2-style) -----------------------------------


def _train_bpe(corpus, vocab_size, specials):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    return tk


def test_tokenizer_json_smollm_style(tmp_path):
    corpus = [f"Is it True or False? {i} + {i} = {2 * i}. True. False." for i in range(300)]
    tk = _train_bpe(corpus, 400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.add_bos is False  # SmolLM2 sequences start without BOS
    assert tok.encode("2 + 2", bos=True) == tok.encode("2 + 2")
    t, f = tok.label_ids()
    assert tok.encode("only): True")[-1] == t and tok.encode("only): False")[-1] == f
    for s in ["Hello wörld 🙂", "  x\n\ny  ", "3.14159"]:
        assert tok.decode(tok.encode(s)) == s

    # No pad anywhere: pad with EOS.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (tmp_path / "config.json").unlink()
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.pad_id == tok.eos_id == 0


def test_tokenizer_json_llama2_style(tmp_path):
    """A Llama 2 / TinyLlama style tokenizer.json ("▁" prepended to the text by the
    normalizer; here a Unigram built from a sentencepiece model): " True" alone is "▁" +
    "▁True", but the label is the one token it is after the cue; BOS is added once."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, processors
    rng = random.Random(0)
    words = "the answer is True False question only): 1 2 3".split()
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8))
                                              for _ in range(300)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, model_type="unigram", byte_fallback=True,
                                   user_defined_symbols=["\u2581True", "\u2581False"],
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tk = HFTokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "hf"
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, True)
    assert len(tok.encode(" True")) == 2
    t, f = tok.label_ids()
    assert (t, f) == (sp.piece_to_id("\u2581True"), sp.piece_to_id("\u2581False"))
    assert tok.encode("the answer is only): True")[-1] == t
    assert tok.encode("the answer is only): False")[-1] == f
    assert tok.encode("the answer", bos=True).count(1) == 1
    assert tok.encode("the answer is 3 ü") == sp.encode("the answer is 3 ü")
    assert tok.decode(tok.encode("the answer is 3 ü")) == "the answer is 3 ü"


def test_label_not_single_token_is_a_clear_error(tmp_path):
    tk = _train_bpe(["abc def ghi"] * 20, 270, ["</s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="' True'"):
        tok.label_ids()


# -- sentencepiece ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    words = "the answer is True False question solution number apples eggs sum total of and".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 999)}"
             for _ in range(400)]
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return d


def test_sentencepiece(sp_dir):
    assert not is_tiktoken_file(sp_dir / "tokenizer.model")
    tok = Tokenizer.from_dir(sp_dir)
    assert tok.kind == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, True)
    ids = tok.encode("the answer is 42", bos=True)
    assert ids[0] == 1 and ids.count(1) == 1
    assert tok.encode_batch(["the answer", "is"], bos=True) == [tok.encode("the answer", bos=True),
                                                                 tok.encode("is", bos=True)]
    t, f = tok.label_ids()
    assert tok.encode("the answer is: True")[-1] == t
    assert tok.encode("the answer is: False")[-1] == f
    for s in ["the total of 12 apples", "ünïcode ✓ and digits 0123"]:  # byte fallback
        assert tok.decode(tok.encode(s)) == s
    with pytest.raises(ValueError, match="apples are"):
        tok.token_id(" apples are")


def test_tiktoken_file_at_top_level_and_missing(llama3_model_file, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(llama3_model_file.read_bytes())
    assert Tokenizer.from_dir(tmp_path).kind == "tiktoken"  # detected by content, not by place
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nothing_here")


def test_bytes_to_unicode_is_gpt2s():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("A")] == "A"
