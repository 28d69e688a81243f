"""Shared prefixes: a cached prefix gives the numbers of the whole rows (model/llama.py), rows
are grouped by their token ids (data/prefixes.py), and scoring and training share by default
with the same results (engine/score.py, train.py)."""
import json

import numpy as np
import pytest
import torch

import model.llama as llama
import train
from data.batches import LengthGroupedSampler, RowDataset, collate, row_tokens
from data.prefixes import family_batches, lcp, plan_groups
from data.prompt import IGNORE, Encoder
from data.read import question_codes, read_table
from engine.build import build_model
from engine.loss import compute_loss
from engine.score import score
from lora.inject import apply_lora, lora_modules
from model.config import LlamaConfig
from model.tokenizer import Tokenizer
from tiny import SHORT_PROMPT, make_workdir, train_args

CPU = torch.device("cpu")


def tiny_model(seed=0, **cfg):
    torch.manual_seed(seed)
    m = llama.Llama(LlamaConfig.tiny(**cfg)).eval()
    for p in m.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.1)
    return m


# Three prefixes of different lengths (so positions differ), five rows of different lengths
# (so both parts are padded), rows 0-1 on prefix 0, rows 2-3 on prefix 1, row 4 on prefix 2.
g = torch.Generator().manual_seed(3)
PREFIXES = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (9, 4, 13)]
RESTS = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 8, 3, 6, 1)]
OF = [0, 0, 1, 1, 2]


def padded(rows):
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    return ids, mask


def whole_and_shared(model, rests=RESTS, of=OF, prefixes=PREFIXES):
    """(hidden states of the whole rows at the rests' positions, those of the rests reading their
    prefix rows), real tokens only."""
    ids, mask = padded([prefixes[p] + r for p, r in zip(of, rests)])
    whole = model.hidden(ids, mask)
    B = len(rests)
    prefix_of = torch.tensor([B + p for p in of] + [-1] * len(prefixes))
    got = model.hidden(*padded(rests + prefixes), prefix_of)[:B]
    ref = torch.zeros_like(got)
    for b, (p, r) in enumerate(zip(of, rests)):
        ref[b, :len(r)] = whole[b, len(prefixes[p]):len(prefixes[p]) + len(r)]
    rest_mask = padded(rests + prefixes)[1][:B]
    return ref[rest_mask], got[rest_mask]


# ----------------------------------------------------------------------------- the cache

@pytest.mark.parametrize("cfg", [{}, dict(num_key_value_heads=4, rope_scaling=None)])  # GQA and MHA
@pytest.mark.parametrize("call_cost", [llama.CALL_COST, 0])  # the rests in one bucket, or one per length
def test_a_cached_prefix_gives_the_whole_rows_numbers(cfg, call_cost, monkeypatch):
    monkeypatch.setattr(llama, "CALL_COST", call_cost)
    parts = len(llama.pack(LlamaConfig.tiny(**cfg), padded(RESTS + PREFIXES)[1], torch.tensor([5, 5, 6, 6, 7, -1, -1, -1]),
                           torch.float32).parts)
    assert parts == (2 if call_cost else 1 + len(set(map(len, RESTS))))
    ref, got = whole_and_shared(tiny_model(**cfg))
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_rests_are_cut_into_buckets_of_like_length():
    # Fifteen rows of about 100 tokens and one of 300: padding all to 300 would triple the
    # attention of the fifteen; the long row gets its own call.
    lengths = [100 + i for i in range(15)] + [300]
    buckets = llama.like_lengths(lengths, [120] * 16)
    assert sorted(i for b in buckets for i in b) == list(range(16))
    assert buckets[-1] == [15] and all(lengths[i] < 115 for b in buckets[:-1] for i in b)
    assert llama.like_lengths([50] * 8, [40] * 8) == [list(range(8))]  # alike: one call
    assert llama.like_lengths([], []) == []


def _rests(p, change):
    return p._replace(parts=p.parts[:1] + [change(part) for part in p.parts[1:]])


def _restart_positions(p, cfg):
    def change(part):
        rows, T = part.real.shape
        return part._replace(rope=llama.rope_cos_sin(cfg, torch.arange(T).expand(rows, T), part.rope[0].dtype))
    return _rests(p, change)


def _every_slot(p, cfg):
    def change(part):
        mask = part.mask.clone()
        mask[..., :part.slots] = True
        return part._replace(mask=mask)
    return _rests(p, change)


def _own_padding(p, cfg):
    def change(part):
        mask, T = part.mask.clone(), part.real.shape[1]
        pad = torch.arange(T)[None, :] >= part.real.sum(-1)[:, None]  # (rows, T): a rest's padding keys
        mask[..., part.slots:] |= pad[:, None, None, :]
        return part._replace(mask=mask)
    return _rests(p, change)


FAULTS = {  # each a plausible bug in the layout; the equality above must catch every one
    "positions restart at 0": _restart_positions,
    "attends to every prefix slot (another prefix's padding)": _every_slot,
    "padding keys of the row visible": _own_padding,
}


@pytest.mark.parametrize("fault", FAULTS)
def test_the_equality_check_catches_each_fault(monkeypatch, fault):
    real = llama.pack
    monkeypatch.setattr(llama, "pack", lambda cfg, *a: FAULTS[fault](real(cfg, *a), cfg))
    ref, got = whole_and_shared(tiny_model())
    assert (got - ref).abs().max() > 1e-3


def test_rows_that_continue_nothing_beside_rows_that_share():
    # Row 2 continues nothing (a question with one solution, beside one with two): it attends to
    # itself only, and is longer than the prefix, so both kinds of row are padded.
    model, lone = tiny_model(), RESTS[1] + RESTS[3] + RESTS[0]
    ids, mask = padded([PREFIXES[0] + RESTS[0], PREFIXES[0] + RESTS[1], lone])
    whole = model.hidden(ids, mask)
    got = model.hidden(*padded([RESTS[0], RESTS[1], lone, PREFIXES[0]]), torch.tensor([3, 3, -1, -1]))
    P = len(PREFIXES[0])
    torch.testing.assert_close(got[0, :len(RESTS[0])], whole[0, P:P + len(RESTS[0])], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1, :len(RESTS[1])], whole[1, P:P + len(RESTS[1])], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[2], whole[2, :len(lone)], atol=2e-6, rtol=1e-5)
    assert (got[0, len(RESTS[0]):] == 0).all()  # padding stays zero


def test_a_row_reading_another_groups_prefix_is_caught():
    ref, got = whole_and_shared(tiny_model())
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    _, wrong = whole_and_shared(tiny_model(), of=[1, 0, 0, 1, 2], prefixes=PREFIXES)  # rows 0-3 swap prefixes
    ref_wrong, _ = whole_and_shared(tiny_model(), of=OF)
    assert (wrong - ref_wrong).abs().max() > 1e-3


def lora_model(seed=0):
    model = tiny_model(seed)
    torch.manual_seed(seed)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    return model.train()


W = torch.randn(sum(map(len, RESTS)), 64, generator=torch.Generator().manual_seed(5))  # (real rest tokens, D)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("call_cost", [llama.CALL_COST, 0])
def test_the_prefix_gets_the_summed_gradient_of_its_rows(checkpointing, call_cost, monkeypatch):
    monkeypatch.setattr(llama, "CALL_COST", call_cost)
    grads = {}
    for name in ("whole", "shared"):
        model = lora_model()
        model.grad_checkpointing = checkpointing
        ref, got = whole_and_shared(model)
        (W * (ref if name == "whole" else got)).sum().backward()  # a random linear read-out of every token
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for n in grads["whole"]:  # float rounding only: measured <= 1e-6 of each gradient's size
        assert (grads["shared"][n] - grads["whole"][n]).norm() <= 1e-5 * grads["whole"][n].norm(), n
    # A prefix cut off from the graph (read through a detach) changes the gradient: the check sees it.
    real = llama.with_prefix
    llama.with_prefix = lambda first, rest, rows, slots: torch.cat([first[rows][:, :, :slots].detach(), rest], dim=2)
    try:
        model = lora_model()
        model.grad_checkpointing = checkpointing
        _, got = whole_and_shared(model)
        (W * got).sum().backward()
    finally:
        llama.with_prefix = real
    a = next(n for n in grads["whole"] if "layers.0.self_attn.q_proj.lora_B" in n)
    assert (dict(model.named_parameters())[a].grad - grads["whole"][a]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- grouping by ids

def test_grouping_is_by_token_ids():
    instr = list(range(1, 41))  # 40 tokens every row starts with
    q1, q2 = list(range(100, 160)), list(range(200, 260))  # two 60-token questions, 3 solutions each
    rows = [instr + q + [7] * k + [2] for q in (q1, q2) for k in (1, 3, 5)]
    group_of, lens = plan_groups(rows)
    assert group_of == [0, 0, 0, 1, 1, 1] and lens == [101, 101]  # each question's rows share it (and a 7)
    for b, g in enumerate(group_of):
        assert rows[b][:lens[g]] == rows[group_of.index(g)][:lens[g]]
    # Rows of different questions share the instruction only: one group, the 40 tokens.
    assert plan_groups([instr + [300 + i] * (3 + i) + [2] for i in range(4)]) == ([0, 0, 0, 0], [40])
    # A grouping that pads the prefix pass more than it saves loses to one group: two groups of
    # 70- and 40-token prefixes (padded to 70) cost more than one 40-token prefix here.
    mixed = [instr + q1[:30] + [7, 8, 9, 2], instr + q1[:30] + [5, 2], instr + [300, 301, 2], instr + [9, 2]]
    assert plan_groups(mixed) == ([0, 0, 0, 0], [40])
    assert plan_groups(rows[:1]) is None  # one row: nothing to share
    assert plan_groups([[1, 5, 6, 7], [2, 5, 6, 7]]) is None  # nothing in common
    assert plan_groups([instr[:3] + [9], instr[:3] + [8]]) is None  # 3 shared tokens: not worth a pass
    # The cue (last token) is never in a prefix, even for duplicate rows.
    assert plan_groups([instr + [2], instr + [2]]) == ([0, 0], [40])
    # No target in a prefix: with every token a target (the full loss), nothing is shared.
    assert plan_groups(rows, [r[1:] + [IGNORE] for r in rows]) is None
    assert lcp([1, 2, 3], [1, 2, 4]) == 2


def test_a_shared_batch_holds_the_same_rows():
    instr = list(range(1, 41))
    ex = [{"input_ids": instr + [50 + i] * (i + 1) + [2], "targets": [IGNORE] * (41 + i) + [7 + i]} for i in range(4)]
    plain, shared = collate(ex, 0), collate(ex, 0, share=True)
    assert "prefix_of" in shared and "prefix_of" not in plain
    assert shared["prefix_of"].tolist() == [4, 4, 4, 4, -1]  # one prefix row, after the four examples
    real = lambda r: shared["input_ids"][r][shared["attention_mask"][r]].tolist()
    for b in range(4):
        assert real(shared["prefix_of"][b]) + real(b) == ex[b]["input_ids"]
        assert shared["targets"][b, shared["cue_pos"][b]] == 7 + b  # the label at the cue, in the rest
    assert (shared["targets"][4] == IGNORE).all()  # a prefix row has no target
    assert row_tokens(shared) == row_tokens(plain) == sum(len(e["input_ids"]) for e in ex)


def test_scoring_batches_keep_a_questions_rows_together():
    instr = list(range(1, 41))
    qs = [list(range(100 * k, 100 * k + 20)) for k in range(1, 6)]
    rows = [instr + qs[i % 5] + [3] * (i % 7) + [2] for i in range(20)]  # 4 rows per question, shuffled
    batches = family_batches(rows, 4)
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert all(len({i % 5 for i in b}) == 1 for b in batches)  # one question per batch


# ----------------------------------------------------------------------------- end to end

# A template whose instruction is long enough to be worth sharing (tiny.py's SHORT_PROMPT is not).
LONG_PROMPT = ("You are a great mathematician. You are a great mathematician. Answer is correct "
               "(True/False only):\n" + SHORT_PROMPT)  # words the tiny tokenizer knows: ~70 tokens


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = make_workdir(tmp_path_factory.mktemp("prefix"), n_rows=120, n_val=40, seed=2)
    (root / "prompt.txt").write_text(LONG_PROMPT)  # train_args reads this template
    return root


def rows_of(work, name):
    tok = Tokenizer.from_dir(work / "model")
    df, _ = read_table(work / name)
    return RowDataset(df, Encoder(tok, LONG_PROMPT, 256, "answer"), pad_id=tok.pad_id), tok


def test_scoring_shares_and_gives_the_unshared_p_true(work):
    ds, tok = rows_of(work, "val.csv")
    model = build_model(work / "model", "fp32", CPU)
    counts, plain_counts = {}, {}
    shared = score(model, ds, 8, CPU, tok.label_ids(), progress=False, counts=counts)
    plain = score(model, ds, 8, CPU, tok.label_ids(), progress=False, share=False, counts=plain_counts)
    assert counts["row_tokens"] == plain_counts["row_tokens"] == plain_counts["computed"]
    assert counts["computed"] < 0.85 * counts["row_tokens"]  # the instruction once per batch
    np.testing.assert_allclose(shared, plain, atol=1e-5)


def test_training_shares_the_prefix_with_the_same_losses(work, tmp_path, monkeypatch):
    # Dropout off: sharing must change nothing but float rounding, step after step.
    runs, passes = {}, []
    real = llama.Llama.hidden
    monkeypatch.setattr(llama.Llama, "hidden", lambda self, ids, mask=None, prefix_of=None:
                        passes.append(prefix_of is not None) or real(self, ids, mask, prefix_of))
    for mode in ("on", "off"):
        out = tmp_path / mode
        assert train.main(train_args(work, out, "--steps", "3", "--batch-size", "4", "--grad-accum", "2",
                                     "--dropout", "0", "--lr", "3e-3", "--share-prefixes", mode, "--max-seq-len", "256",
                                     "--activations", "fp32")) == 0  # (bf16 rounds differently per shape)
        runs[mode] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        shared, passes[:] = sum(passes), []
        assert shared >= 6 if mode == "on" else shared == 0  # every micro-batch (and evaluation) shared, or none
    losses = {m: [r["loss"] for r in rs if "loss" in r] for m, rs in runs.items()}
    np.testing.assert_allclose(losses["on"], losses["off"], rtol=1e-5)
    acc = {m: [r["eval"]["accuracy"] for r in rs if "eval" in r] for m, rs in runs.items()}
    assert acc["on"] == acc["off"]


def test_a_training_batch_shares_its_instruction(work):
    ds, _ = rows_of(work, "train.csv")
    b = ds.batch([0, 1, 2, 3], share=True)
    assert b["prefix_of"].tolist() == [4, 4, 4, 4, -1]  # one group: the template's start
    model = build_model(work / "model", "fp32", CPU)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    model.train()
    grads = []
    for batch in (b, ds.batch([0, 1, 2, 3])):
        model.zero_grad()
        loss = compute_loss(model, batch, "answer", CPU)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for x, y in zip(grads[0][1], grads[1][1]):  # float rounding: the sums run in another order
        assert (x - y).norm() <= 1e-5 * y.norm()


def test_group_by_question_batches_a_questions_rows_together_seeded_and_resumable():
    q = np.repeat(np.arange(50), 4)  # 50 questions x 4 rows
    lengths = np.random.default_rng(0).integers(20, 300, size=200)
    s = LengthGroupedSampler(lengths, 4, seed=1, questions=q)
    batches = [s.next_batch() for _ in range(len(s))]
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert np.mean([len({q[i] for i in b}) == 1 for b in batches]) == 1.0  # each batch: one question
    again = LengthGroupedSampler(lengths, 4, seed=1, questions=q)
    assert [again.next_batch() for _ in range(10)] == batches[:10]
    state = again.state_dict()
    resumed = LengthGroupedSampler(lengths, 4, seed=1, questions=q)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(5)] == batches[10:15]
    ranks = [LengthGroupedSampler(lengths, 4, seed=1, questions=q, rank=r, world_size=2) for r in (0, 1)]
    mine = [set(i for b in r.epoch_batches(0) for i in b) for r in ranks]
    assert not mine[0] & mine[1]
    assert LengthGroupedSampler(lengths, 4, seed=2, questions=q).epoch_batches(0) != s.epoch_batches(0)


def test_train_py_groups_by_question(work, tmp_path, monkeypatch):
    import pandas as pd
    df = pd.read_csv(work / "train.csv")
    df["question"] = [f"What is question {i // 2}?" for i in range(len(df))]  # two rows per question
    df.to_csv(tmp_path / "train.csv", index=False)
    seen = []
    real = RowDataset.batch
    monkeypatch.setattr(RowDataset, "batch", lambda self, pos, share=False: seen.append(list(pos)) or real(self, pos, share))
    args = train_args(work, tmp_path / "g", "--steps", "3", "--batch-size", "2", "--grad-accum", "1", "--group-by-question", "--max-seq-len", "256")
    args[args.index("--data") + 1] = str(tmp_path / "train.csv")
    assert train.main(args) == 0
    train_batches = [b for b in seen if len(b) == 2][:3]
    assert len(train_batches) == 3 and all(b[0] // 2 == b[1] // 2 for b in train_batches)  # one question each
