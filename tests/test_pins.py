"""p_true pinned to rows and to polarity against an independent reference (transformers + PEFT).

The reference scores one row at a time (no padding, no batching, no sorting): the prompt is
rendered here from prompt.txt, tokenized with `tokenizers` (BOS once, then the prompt, whose
last token is the cue), run through transformers' LlamaForCausalLM (+ PEFT's LoRA), and
p_true = softmax(logit(" False"), logit(" True"))[1] at the last position. Nothing of
predict.py, engine/ or data/ is used on the reference side.

Ours: predict.py's CLI (rows of very different lengths in shuffled order, several batches),
and the p_true arrays that training's evaluation computes (captured at the trainer's `score`),
at step 0 (the base model) and at the end (the saved adapter), over several chunks.
A p_true written back in length-sorted order, or " True" / " False" swapped, fails here.
"""
import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import predict
import train
from tiny import make_workdir, synthetic_rows, train_args

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
tokenizers = pytest.importorskip("tokenizers")

# peft calls transformers' deprecated is_gradient_checkpointing: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

# Where training's evaluation (engine/score.py: evaluate) looks up the scoring function.
SCORE_AT = ("engine.score", "score")
MAX_LEN = 512  # predict's --max-seq-len here: no row is cut (the reference never cuts)
EVAL_BATCH, EVAL_CHUNK = 3, 6  # training's evaluation: 40 rows -> 7 chunks of 2 batches
ATOL = 1e-5
EMPTY = "(none)"  # what the prompt shows for an empty answer / solution


# ----------------------------------------------------------------------------- the reference

class Reference:
    """transformers (+ PEFT) scoring of single, unpadded rows."""

    def __init__(self, root: Path):
        d = root / "model"
        self.tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        bos = json.loads((d / "tokenizer_config.json").read_text())["bos_token"]
        self.bos_id = self.tok.token_to_id(bos if isinstance(bos, str) else bos["content"])
        self.true_id, self.false_id = self.tok.token_to_id(" True"), self.tok.token_to_id(" False")
        assert None not in (self.bos_id, self.true_id, self.false_id)
        template = (root / "prompt.txt").read_text(encoding="utf-8")
        self.template = template[:-1] if template.endswith("\n") else template  # the cue ends it
        self.base = self._load(d)
        self.adapted = peft.PeftModel.from_pretrained(self._load(d), str(root / "run")).eval()

    @staticmethod
    def _load(d):
        return transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()

    def ids(self, question, answer, solution) -> list[int]:
        text = self.template.format(question=question or EMPTY, answer=answer or EMPTY,
                                    solution=solution or EMPTY)
        ids = [self.bos_id] + self.tok.encode(text, add_special_tokens=False).ids
        assert len(ids) <= MAX_LEN, "keep rows short: the reference does not truncate"
        return ids

    @torch.no_grad()
    def p_true(self, df: pd.DataFrame, adapter: bool) -> tuple[np.ndarray, np.ndarray]:
        """(p_true, token count) per row of df, in df's order."""
        model = self.adapted if adapter else self.base
        p, n = [], []
        for q, a, s in zip(df["question"], df["answer"], df["solution"]):
            ids = self.ids(q, a, s)
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            p.append(torch.softmax(logits[[self.false_id, self.true_id]], -1)[1].item())
            n.append(len(ids))
        return np.array(p), np.array(n)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model, an adapter trained for 4 steps, and every p_true training's evaluation
    computed (each call of the trainer's `score`, in call order)."""
    root = make_workdir(tmp_path_factory.mktemp("pins"), n_rows=160, n_val=40, seed=5)
    calls, problem = [], None
    try:
        module = importlib.import_module(SCORE_AT[0])
        orig = getattr(module, SCORE_AT[1])
    except (ImportError, AttributeError) as e:
        module, problem = None, f"cannot patch {'.'.join(SCORE_AT)}: {e!r}"

    def capture(*args, **kwargs):
        bound = inspect.signature(orig).bind(*args, **kwargs)
        bound.arguments["chunk_rows"] = EVAL_CHUNK  # several chunks, not one (rows are few)
        p = orig(*bound.args, **bound.kwargs)
        calls.append(np.array(p, dtype=np.float64))
        return p

    with pytest.MonkeyPatch.context() as mp:
        if module is not None:
            mp.setattr(module, SCORE_AT[1], capture)
        assert train.main(train_args(root, root / "run", "--steps", "4", "--batch-size", "2", "--grad-accum", "1",
                                     "--lr", "3e-3", "--eval-batch-size", str(EVAL_BATCH), "--precision", "fp32")) == 0
    return root, calls, problem


@pytest.fixture(scope="module")
def ref(run):
    return Reference(run[0])


@pytest.fixture(scope="module")
def test_csv(tmp_path_factory):
    """Kaggle's test layout (ID first, no is_correct), shuffled IDs, 48 rows of ~60 to ~380
    tokens in shuffled order; a few have an empty answer or solution."""
    n = 48
    rng = np.random.default_rng(11)
    df = synthetic_rows(n, seed=11).drop(columns=["is_correct", "id"])
    steps = rng.permutation(np.arange(n) * 40 // n)  # "We add a and b. " 0..39 times
    df["solution"] = [s[:s.index(". ") + 2] * int(k) + s[s.index("The total"):]
                      for s, k in zip(df["solution"], steps)]
    df.loc[rng.choice(n, 3, replace=False), "answer"] = ""
    df.loc[rng.choice(n, 3, replace=False), "solution"] = ""
    df.insert(0, "ID", [f"t{i:03d}" for i in rng.permutation(n)])
    path = tmp_path_factory.mktemp("pins_test") / "test.csv"
    df.to_csv(path, index=False)
    return path, df


@pytest.fixture(scope="module")
def predicted(run, test_csv, tmp_path_factory):
    root = run[0]
    out = tmp_path_factory.mktemp("pins_sub") / "submission.csv"
    assert predict.main(["--model", str(root / "model"), "--device", "cpu", "--adapter", str(root / "run"),
                         "--data", str(test_csv[0]), "--out", str(out), "--probs", "--batch-size", "3",
                         "--max-seq-len", str(MAX_LEN)]) == 0
    return pd.read_csv(out, dtype={"ID": str, "is_correct": str})


# ----------------------------------------------------------------------------- tests

def test_fixture_has_teeth(ref, test_csv):
    """The data the other tests use can catch what they claim to: rows of very different,
    unsorted lengths; an adapter that really moves p_true; decisions of both classes."""
    df = test_csv[1]
    p_base, n_tok = ref.p_true(df, adapter=False)
    p_adapted, _ = ref.p_true(df, adapter=True)
    assert n_tok.max() >= 4 * n_tok.min()
    assert not (np.all(np.diff(n_tok) >= 0) or np.all(np.diff(n_tok) <= 0))
    assert np.abs(p_adapted - p_base).max() > 0.05  # an ignored adapter would be seen
    assert 5 <= (p_adapted > 0.5).sum() <= len(df) - 5  # a swapped decision would be seen


def test_predict_cli_pins_p_true_to_rows_and_polarity(predicted, ref, test_csv):
    """predict.py's submission, row by row, against the reference on the adapter."""
    df = test_csv[1]
    expected, _ = ref.p_true(df, adapter=True)
    assert list(predicted.columns) == ["ID", "is_correct", "p_true"]
    assert predicted["ID"].tolist() == df["ID"].tolist()  # input IDs, input order
    np.testing.assert_allclose(predicted["p_true"].to_numpy(), expected, rtol=0, atol=ATOL)
    decided = (predicted["is_correct"] == "True").to_numpy()
    assert set(predicted["is_correct"]) == {"True", "False"}
    np.testing.assert_array_equal(decided, predicted["p_true"].to_numpy() > 0.5)
    clear = np.abs(expected - 0.5) > ATOL  # (a row within ATOL of 0.5 may fall either way)
    assert clear.sum() >= len(df) - 2
    np.testing.assert_array_equal(decided[clear], expected[clear] > 0.5)


def test_training_evaluation_pins_p_true_to_rows_and_polarity(run, ref):
    """The p_true training's evaluation computed at step 0 (the base) and at the end (the saved
    adapter), row by row in val.csv's order, against the reference."""
    root, calls, problem = run
    if problem:
        pytest.fail(problem)
    assert len(calls) == 2  # --eval-every 0: step 0 and the last step
    val = pd.read_csv(root / "val.csv", dtype=str, keep_default_na=False)
    base, _ = ref.p_true(val, adapter=False)
    adapted, _ = ref.p_true(val, adapter=True)
    assert np.abs(adapted - base).max() > 0.05
    np.testing.assert_allclose(calls[0], base, rtol=0, atol=ATOL)
    np.testing.assert_allclose(calls[-1], adapted, rtol=0, atol=ATOL)
    assert 0 < (calls[-1] > 0.5).sum() < len(val)  # both decisions occur
