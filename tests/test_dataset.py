"""data/read.py, data/prompt.py, data/batches.py: reading and validating tables, the prompt, truncation, splits, batches.

Uses a tiny byte-level BPE (trained here in milliseconds) whose template adds BOS, like
Llama 3's; " True" and " False" are single tokens in it.
"""
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

from data.batches import LengthGroupedSampler, RowDataset, collate
from data.prompt import CUT, DEFAULT_PROMPT, EMPTY, IGNORE, Encoder, load_prompt
from data.read import DataError, read_table, split_by_question, summary
from model.tokenizer import Tokenizer

CUE = "Answer is correct (True/False only):"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers
    d = tmp_path_factory.mktemp("tiny_tok")
    rng = random.Random(0)
    words = "the answer is True False question solution apples eggs sum total of and x y".split()
    corpus = [DEFAULT_PROMPT] * 5 + [" ".join(rng.choice(words) for _ in range(10)) + f" {i}"
                                     for i in range(300)]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    t = Tokenizer.from_dir(d)
    assert (t.bos_id, t.eos_id, t.pad_id, t.add_bos) == (0, 1, 2, True)
    return t


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


GOOD = "question,answer,solution,is_correct\nWhat is 1+1?,2,1+1=2,True\nWhat is 2+2?,5,2+2=5,False\n"


# -- reading --------------------------------------------------------------------------------


def test_read_good_csv_keeps_text(tmp_path):
    f = _write(tmp_path / "t.csv", "is_correct,extra,solution,question,answer\n"
               "true,x,,\"multi\nline, question\",007\n0,y,s,q2,NA\n1,z,s,q3,\n")
    df, st = read_table(f)
    assert df["answer"].tolist() == ["007", "NA", ""]  # no number or NA parsing
    assert df["solution"].tolist() == ["", "s", "s"]
    assert df["question"].iloc[0] == "multi\nline, question"
    assert df["label"].tolist() == [1, 0, 1] and df["is_correct"].tolist() == [True, False, True]
    assert df["extra"].tolist() == ["x", "y", "z"]
    assert (st["rows_total"], st["rows_kept"], st["skipped"], st["has_label"]) == (3, 3, 0, True)
    assert df["_row"].tolist() == df.index.tolist() == [0, 1, 2]


def test_read_kaggle_test_layout(tmp_path):
    f = _write(tmp_path / "test.csv", "ID,question,answer,solution\n0,q1,1,s\n1,q2,2,s\n")
    df, st = read_table(f, require_label=False)
    assert st["id_column"] == "ID" and not st["has_label"] and st["ids"] == ["0", "1"]
    assert df["ID"].tolist() == ["0", "1"] and df["label"].tolist() == [-1, -1]
    df, _ = read_table(f)  # require_label=None accepts either layout
    with pytest.raises(DataError, match="missing column.*is_correct"):
        read_table(f, require_label=True)


def test_empty_file_and_no_rows(tmp_path):
    with pytest.raises(DataError, match=r"^e\.csv: empty file"):
        read_table(_write(tmp_path / "e.csv", ""))
    with pytest.raises(DataError, match="no data rows"):
        read_table(_write(tmp_path / "h.csv", "question,answer,solution,is_correct\n"))


def test_missing_column_lists_found(tmp_path):
    f = _write(tmp_path / "m.csv", "question,answer,is_correct,note\nq,1,True,n\n")
    with pytest.raises(DataError) as e:
        read_table(f)
    assert str(e.value) == "m.csv: missing column(s) solution; found: question, answer, is_correct, note"


def test_bad_label_names_row(tmp_path):
    f = _write(tmp_path / "b.csv", GOOD + "q3,1,s,maybe\n")
    with pytest.raises(DataError, match=r"b\.csv: data row 3 \(1-based, header not counted\): "
                                        r"is_correct is 'maybe'"):
        read_table(f)


def test_non_utf8_byte_names_row(tmp_path):
    f = _write(tmp_path / "u.csv", GOOD.encode() + b"q3,1,caf\xe9,True\n")
    with pytest.raises(DataError, match=r"data row 3 .*non-UTF-8 byte 0xe9") as e:
        read_table(f)
    assert "\n" not in str(e.value)


def test_empty_question_names_row(tmp_path):
    f = _write(tmp_path / "q.csv", "question,answer,solution,is_correct\nq1,1,s,True\n  ,1,s,True\n")
    with pytest.raises(DataError, match=r"data row 2 .*question is empty"):
        read_table(f)


def test_broken_record_names_row(tmp_path):
    f = _write(tmp_path / "r.csv", GOOD + "only,three,fields\n")
    with pytest.raises(DataError, match=r"data row 3 .*3 fields, expected 4"):
        read_table(f)


def test_skip_bad_rows_counts_by_reason(tmp_path):
    f = _write(tmp_path / "s.csv", GOOD.encode() + b"q3,1,s,maybe\n,1,s,True\nq5,1,\xff,0\n"
               b"q6,1,s,nope\nq7,1,s,1\n")
    with pytest.raises(DataError, match=r"data row 3 .*\(3 more bad rows\)"):
        read_table(f)
    df, st = read_table(f, skip_bad_rows=True)
    assert df["question"].tolist() == ["What is 1+1?", "What is 2+2?", "q7"]
    assert df.index.tolist() == df["_row"].tolist() == [0, 1, 6]  # source data rows survive
    assert st["skipped_by_reason"] == {"bad label": 2, "empty question": 1, "non-UTF-8": 1}
    assert (st["rows_total"], st["rows_kept"], st["skipped"]) == (7, 3, 4)
    line = summary(st, truncated=1)
    assert "7 rows read, 3 kept" in line and "2 bad label" in line and "1 truncated" in line


def test_test_file_ids_and_source_rows(tmp_path, tok):
    """ids cover every parsed row (skipped ones too) and `_row` survives reset_index, so a
    predictor can write one line per input row."""
    f = _write(tmp_path / "t.csv", "ID,question,answer,solution\na,q1,1,s\nb, ,1,s\nc,q3,1,s\n")
    df, st = read_table(f, skip_bad_rows=True)
    assert st["ids"] == ["a", "b", "c"] and st["rows_total"] == 3 and st["skipped"] == 1
    assert df["_row"].tolist() == [0, 2]
    ds = RowDataset(df.reset_index(drop=True), Encoder(tok))
    assert [ex["label"] for ex in ds.get_batch([1, 0])] == [-1, -1]  # unlabelled: no target label


def test_jsonl(tmp_path):
    rows = [{"question": "q1", "answer": 7, "solution": None, "is_correct": True},
            {"question": "q2", "answer": "x", "solution": "s", "is_correct": "false"}]
    f = _write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    df, st = read_table(f)
    assert df["answer"].tolist() == ["7", "x"] and df["solution"].tolist() == ["", "s"]
    assert df["label"].tolist() == [1, 0]
    bad = _write(tmp_path / "bad.jsonl", (json.dumps(rows[0]) + "\n").encode() + b'{"question": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: non-UTF-8"):
        read_table(bad)
    bad = _write(tmp_path / "bad2.jsonl", json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"line 2: not a JSON object"):
        read_table(bad)


def test_parquet(tmp_path):
    f = tmp_path / "t.parquet"
    pd.DataFrame({"id": [10, 11], "question": ["q1", "q2"], "answer": ["007", None],
                  "solution": ["s", "s"], "is_correct": [True, False], "score": [0.5, 1.5]}).to_parquet(f)
    df, st = read_table(f)
    assert st["id_column"] == "id" and df["id"].tolist() == ["10", "11"]
    assert df["answer"].tolist() == ["007", ""] and df["label"].tolist() == [1, 0]
    assert df["score"].tolist() == [0.5, 1.5]


def test_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        read_table(_write(tmp_path / "x.txt", "a"))


# -- prompt ---------------------------------------------------------------------------------


def test_prompt_template_file(tmp_path):
    assert DEFAULT_PROMPT.endswith(CUE)
    p = _write(tmp_path / "p.txt", "Q: {question}\nA: {answer}\nS: {solution}\nCorrect? {{True/False}}:\n")
    assert load_prompt(p) == "Q: {question}\nA: {answer}\nS: {solution}\nCorrect? {{True/False}}:"
    with pytest.raises(DataError, match=r"unknown placeholder \{answr\}"):
        load_prompt(_write(tmp_path / "p2.txt", "Q: {question} A: {answr} ok?"))
    with pytest.raises(DataError, match="must end with the cue"):
        load_prompt(_write(tmp_path / "p3.txt", "Q: {question} A: {answer}\n"))
    with pytest.raises(DataError, match="literal braces"):
        load_prompt(_write(tmp_path / "p4.txt", "Q: {question} \\boxed{ ok?"))


def test_render_marks_empty_fields(tok):
    enc = Encoder(tok)
    text = enc.render("What is 2+2?", "", "")
    assert text == DEFAULT_PROMPT.format(question="What is 2+2?", answer=EMPTY, solution=EMPTY)


# -- encoding -------------------------------------------------------------------------------


ROW = {"question": "the sum of x and y", "answer": "12", "solution": "x and y total 12", "label": 1}


def test_answer_mode(tok):
    enc = Encoder(tok, max_seq_len=512)
    ex = enc.encode(ROW)
    ids = ex["input_ids"]
    assert ids == tok.encode(enc.render(ROW["question"], ROW["answer"], ROW["solution"]), bos=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    true_id, false_id = tok.label_ids()
    assert true_id not in ids[-3:]  # the label is a target, never an input
    assert ex["targets"][-1] == true_id
    assert all(t == IGNORE for t in ex["targets"][:-1])
    assert len(ex["targets"]) == len(ids) and ex["label"] == 1 and ex["truncated"] is False
    assert tok.decode(ids[1:]).endswith(CUE)
    assert enc.encode({**ROW, "label": 0})["targets"][-1] == false_id
    assert enc.encode({k: v for k, v in ROW.items() if k != "label"})["targets"][-1] == IGNORE
    assert enc.encode({**{k: v for k, v in ROW.items() if k != "label"}, "is_correct": "False"})["label"] == 0


def test_full_mode(tok):
    ex = Encoder(tok, loss="full").encode(ROW)
    ids, tg = ex["input_ids"], ex["targets"]
    assert tg[:-1] == ids[1:] and tg[-1] == tok.label_ids()[0]


def test_truncation_property(tok):
    """Over many random lengths: never over the limit, the question's start, the whole answer
    and the cue survive, and a row is marked truncated exactly when it had to be cut."""
    rng = random.Random(0)
    words = "the answer is question solution apples eggs sum total of and x y 12 345 + = ( )".split()
    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))
    for case in range(150):
        L = rng.randint(100, 300)  # the tiny vocabulary spends ~85 tokens on the template
        q = "Q" + str(case) + " " + text(rng.choice([1, 5, 30, 200, 600]))
        a = text(rng.choice([1, 3, 10]))
        s = text(rng.choice([0, 5, 50, 300, 2000]))
        enc = Encoder(tok, max_seq_len=L)
        ex = enc.encode({"question": q, "answer": a, "solution": s, "label": 0})
        ids = ex["input_ids"]
        full = len(tok.encode(enc.render(q, a, s), bos=True))
        assert len(ids) <= L, (case, len(ids), L)
        assert ex["truncated"] == (full > L)
        out = tok.decode(ids[1:])
        assert out.endswith(CUE)
        assert ("Question: " + q.split()[0]) in out  # the question's start
        if len(tok.encode(enc.render(q[:20], a, CUT), bos=True)) <= L:  # else even the answer is cut
            assert ("Answer: " + a + "\n" + CUE) in out  # the whole answer, then the cue
        if ex["truncated"]:
            assert CUT.strip() in out
            if len(tok.encode(enc.render(q, a, ""), bos=True)) + 8 < L:
                assert q in out  # the question is only cut when the solution alone can't make room
        assert ex["targets"][-1] == tok.label_ids()[1]


def test_truncation_keeps_solution_head_and_tail(tok):
    s = "HEADWORD " + " ".join(["x y"] * 500) + " TAILWORD"
    ex = Encoder(tok, max_seq_len=140).encode({"question": "q", "answer": "1", "solution": s, "label": 1})
    out = tok.decode(ex["input_ids"])
    assert len(ex["input_ids"]) <= 140 and "HEADWORD" in out and "TAILWORD" in out


def test_max_seq_len_too_small(tok):
    with pytest.raises(DataError, match="max_seq_len=10 is too small"):
        Encoder(tok, max_seq_len=10)


def test_encode_many_matches_encode(tok):
    enc = Encoder(tok, max_seq_len=120)
    rows = [{**ROW, "solution": ROW["solution"] * k} for k in (1, 10, 40)]
    assert enc.encode_many(rows) == [enc.encode(r) for r in rows]


# -- split ----------------------------------------------------------------------------------


def _table(n_questions=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for qi in range(n_questions):
        for _ in range(rng.integers(1, 6)):
            rows.append({"question": f"question {qi} " + "x" * int(rng.integers(0, 50)),
                         "answer": str(rng.integers(0, 100)), "solution": "y" * int(rng.integers(0, 400)),
                         "label": int(rng.integers(0, 2))})
    return pd.DataFrame(rows)


def test_split_by_question():
    df = _table()
    tr, va = split_by_question(df, 0.2, seed=1)
    assert set(tr["question"]).isdisjoint(va["question"])
    assert len(tr) + len(va) == len(df) and set(tr.index) | set(va.index) == set(df.index)
    assert abs(len(va) / len(df) - 0.2) < 0.03
    tr2, va2 = split_by_question(df, 0.2, seed=1)
    assert va2.index.tolist() == va.index.tolist()
    _, va3 = split_by_question(df, 0.2, seed=2)
    assert va3.index.tolist() != va.index.tolist()
    tr0, va0 = split_by_question(df, 0.0, seed=1)
    assert len(tr0) == len(df) and len(va0) == 0


# -- sampler --------------------------------------------------------------------------------


def _take(s, n):
    return [s.next_batch() for _ in range(n)]


def test_sampler_covers_epoch_and_groups_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=1003)
    s = LengthGroupedSampler(lengths, batch_size=8, seed=0, mega_batches=16)
    assert len(s) == 126
    epoch0 = _take(s, len(s))
    flat = sorted(i for b in epoch0 for i in b)
    assert flat == list(range(1003))  # every row once, the short batch kept
    # Length grouping: far less padding than random batches.
    waste = sum(max(lengths[b]) * len(b) - sum(lengths[b]) for b in epoch0)
    perm = rng.permutation(1003)
    rand = sum(max(lengths[perm[i:i + 8]]) * len(perm[i:i + 8]) - sum(lengths[perm[i:i + 8]])
               for i in range(0, 1003, 8))
    assert waste < rand / 4
    epoch1 = _take(s, len(s))
    assert epoch1 != epoch0 and s.epoch == 1


def test_sampler_same_seed_same_batches():
    lengths = np.arange(500) % 37
    a = _take(LengthGroupedSampler(lengths, 4, seed=5), 300)
    b = _take(LengthGroupedSampler(lengths, 4, seed=5), 300)
    c = _take(LengthGroupedSampler(lengths, 4, seed=6), 300)
    assert a == b and a != c


@pytest.mark.parametrize("stop", [10, 99, 125, 130, 251])  # mid-epoch, at and across the boundary
def test_sampler_resume(stop):
    lengths = np.arange(500) % 37
    ref = LengthGroupedSampler(lengths, 4, seed=3)  # 125 batches per epoch
    want = _take(ref, 300)
    s = LengthGroupedSampler(lengths, 4, seed=3)
    _take(s, stop)
    state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint file
    assert set(state) == {"epoch", "position", "seed"}
    r = LengthGroupedSampler(lengths, 4, seed=999)  # the state's seed wins
    r.load_state_dict(state)
    assert _take(r, 300 - stop) == want[stop:]


def test_sampler_ddp_ranks_partition():
    lengths = np.random.default_rng(1).integers(1, 500, size=1001)
    W = 3
    single = LengthGroupedSampler(lengths, 4, seed=7)
    ranks = [LengthGroupedSampler(lengths, 4, seed=7, rank=r, world_size=W) for r in range(W)]
    assert len({len(r) for r in ranks}) == 1  # same step count on every rank
    glob = single.epoch_batches(0)
    per_rank = [r.epoch_batches(0) for r in ranks]
    for r in range(W):
        assert per_rank[r] == glob[r:len(ranks[0]) * W:W]
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))  # disjoint
    assert len(seen) >= 1001 - W * 4  # only the uneven tail is left out


# -- batches --------------------------------------------------------------------------------


def test_collate_and_row_dataset(tok):
    df = _table(20)
    df.index = df.index * 10 + 3  # source rows need not be 0..n-1
    enc = Encoder(tok, max_seq_len=120)
    ds = RowDataset(df, enc, cache_size=4)
    assert ds.pad_id == tok.pad_id and len(ds.lengths) == len(df)
    batch = ds.batch([2, 0, 5])
    B, T = batch["input_ids"].shape
    assert B == 3 and batch["attention_mask"].dtype == torch.bool
    labels = [int(df["label"].iloc[i]) for i in (2, 0, 5)]
    for b in range(B):
        n = int(batch["attention_mask"][b].sum())
        assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
        assert int(batch["cue_pos"][b]) == n - 1
        assert (batch["input_ids"][b, n:] == tok.pad_id).all()
        assert (batch["targets"][b, n:] == IGNORE).all()
        label_tok = tok.label_ids()[0] if labels[b] == 1 else tok.label_ids()[1]
        assert int(batch["targets"][b, n - 1]) == label_tok
        assert (batch["targets"][b, :n - 1] == IGNORE).all()
    assert ds[2] == ds.get_batch([2])[0]
    sampler = LengthGroupedSampler(ds.lengths, 4, seed=0)
    for _ in range(len(sampler)):
        ds.batch(sampler.next_batch())
    st = ds.stats
    assert st["rows"] == st["encoded"] == len(df)
    expected = sum(len(tok.encode(enc.render(r.question, r.answer, r.solution), bos=True)) > 120
                   for r in df.itertuples())
    assert st["truncated"] == expected > 0


def test_collate_full_mode_shapes(tok):
    enc = Encoder(tok, loss="full")
    exs = enc.encode_many([ROW, {**ROW, "solution": ROW["solution"] * 5, "label": 0}])
    batch = collate(exs, pad_id=tok.pad_id)
    short = len(exs[0]["input_ids"])
    assert batch["targets"][0, :short - 1].tolist() == exs[0]["input_ids"][1:]
    assert batch["targets"][0, short:].eq(IGNORE).all()
