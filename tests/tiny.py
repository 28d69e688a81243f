"""A tiny but real HF model folder for CLI tests: config.json, model.safetensors, tokenizer.json.

The tokenizer is a byte-level BPE trained here on synthetic math-verification text, with
" True" and " False" as single tokens, so the whole pipeline (read → prompt → tokenize → model)
runs as it does for Llama 3, in seconds.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from model.config import LlamaConfig
from model.llama import Llama


def synthetic_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """Rows whose label is learnable from the text: the answer equals a + b or it does not."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        ok = rng.random() < 0.5
        ans = a + b if ok else a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        rows.append(dict(id=f"r{i}", question=f"What is {a} plus {b}? (q{i % (n // 2 or 1)})",
                         solution=f"We add {a} and {b}. " * rng.randint(1, 4) + f"The total is {ans}.",
                         answer=str(ans), is_correct=ok))
    return pd.DataFrame(rows)


def make_tokenizer(corpus: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(" True", normalized=False), AddedToken(" False", normalized=False)])
    return tok


def make_tiny_model_dir(path: Path, seed: int = 0, **cfg_overrides) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    df = synthetic_rows(200, seed)
    corpus = (df.question + " " + df.solution + " Answer: " + df.answer).tolist()
    corpus += ["You are a great mathematician. Question: Solution: Answer is correct (True/False only):"] * 20
    tok = make_tokenizer(corpus)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True}))
    cfg = LlamaConfig.tiny(vocab_size=tok.get_vocab_size(), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           **cfg_overrides)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=1))
    torch.manual_seed(seed)
    model = Llama(cfg)
    for name, p in model.named_parameters():  # HF-like init: N(0, 0.02) weights, unit norms
        if p.dim() > 1:
            # A wider head than HF's 0.02, so that logits can move far enough to learn a label.
            torch.nn.init.normal_(p, std=0.3 if name == "lm_head.weight" else 0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


# A short template keeps rows short for the tiny tokenizer (the built-in one is ~270 tokens here).
SHORT_PROMPT = "Q: {question}\nS: {solution}\nA: {answer}\nAnswer is correct (True/False only):"


def make_workdir(root: Path, n_rows: int, n_val: int, seed: int) -> Path:
    """root/model (a tiny model folder), root/train.csv, root/val.csv and root/prompt.txt."""
    root = Path(root)
    make_tiny_model_dir(root / "model")
    df = synthetic_rows(n_rows, seed=seed)
    df.iloc[:n_rows - n_val].to_csv(root / "train.csv", index=False)
    df.iloc[n_rows - n_val:].to_csv(root / "val.csv", index=False)
    (root / "prompt.txt").write_text(SHORT_PROMPT)
    return root


def train_args(root: Path, out: Path | None, *extra: str) -> list[str]:
    """train.py flags for a small CPU run on make_workdir(root); out None: no --out (a new runs/run-NNN)."""
    return ["--model", str(root / "model"), "--data", str(root / "train.csv"), "--val-file", str(root / "val.csv"),
            "--prompt-file", str(root / "prompt.txt"), *(["--out", str(out)] if out is not None else []),
            "--r", "4", "--alpha", "8", "--max-seq-len", "128", "--eval-every", "0", "--device", "cpu", *extra]
