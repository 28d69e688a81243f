"""Data pipeline speed on a contest-sized table, and how many real rows fit in max_seq_len.

Generates a synthetic train CSV shaped like the contest's (1M rows, ~1.5 GB: real questions and
solutions from data/*.csv, several solutions per question, solution lengths drawn around the
contest's ~1.5 KB per row), then times what a training run does before its first step:
read + validate the table, split by question, build the length-grouped sampler, and tokenize
and collate the first batch, all through data/ (read.read_table, read.split_by_question,
prompt.Encoder, batches.RowDataset and LengthGroupedSampler). Then the tokenization rate
(rows/s, tokens/s) over many rows. Run from the repository root.

    python -m bench.data_speed                     # 1M rows (~1.5 GB in a temp dir, deleted after)
    python -m bench.data_speed --rows 50000        # quick run
    python -m bench.data_speed --rows 2000 --tokenize-rows 500   # smoke test, seconds
    python -m bench.data_speed --coverage          # % of the real sets within 256/512/1024 tokens

Tokenizer: --tokenizer DIR, else the real Llama-3 vocabulary from the test-only package
quicktok-v1 (written out as Meta's original/tokenizer.model), else the default model's.
"""
from __future__ import annotations

import argparse
import base64
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import REPO, timed
from data.batches import LengthGroupedSampler, RowDataset
from data.prompt import DEFAULT_PROMPT, Encoder
from data.read import read_table, split_by_question, summary
from model.tokenizer import Tokenizer


def load_tokenizer(arg: str | None, tmp: Path) -> tuple[Tokenizer, str]:
    if arg:
        return Tokenizer.from_dir(arg), arg
    try:
        import quicktok
    except ImportError:
        from model.default import default_model_dir
        d = default_model_dir()
        return Tokenizer.from_dir(d), f"default model ({d})"
    # quicktok's llama3.vocab: u32 count, then (u16 length, bytes, u32 rank) records.
    b = (Path(quicktok.__file__).parent / "data" / "llama3.vocab").read_bytes()
    (n,), o, lines = struct.unpack_from("<I", b, 0), 4, []
    for _ in range(n):
        (ln,) = struct.unpack_from("<H", b, o)
        tok = b[o + 2:o + 2 + ln]
        (rank,) = struct.unpack_from("<I", b, o + 2 + ln)
        o += 6 + ln
        lines.append((rank, base64.b64encode(tok) + b" %d\n" % rank))
    d = tmp / "llama3" / "original"
    d.mkdir(parents=True)
    (d / "tokenizer.model").write_bytes(b"".join(line for _, line in sorted(lines)))
    return Tokenizer.from_dir(d.parent), "Llama-3 (Meta's tiktoken file, from quicktok's vocabulary)"


def real_rows() -> pd.DataFrame:
    files = sorted((REPO / "data").glob("*.csv"))
    if not files:
        sys.exit("no data/*.csv: run `python -m data.prepare` first")
    return pd.concat([read_table(f)[0][["question", "answer", "solution", "is_correct"]] for f in files],
                     ignore_index=True)


def generate(path: Path, rows: int, bytes_per_row: int, per_question: int, seed: int) -> None:
    """Write a contest-shaped CSV: rows share questions in groups of ~per_question, and each
    solution is real solutions joined until it reaches a length drawn around the target."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    src = real_rows()
    qs, ans, sols = src["question"].tolist(), src["answer"].tolist(), src["solution"].tolist()
    rng = np.random.default_rng(seed)
    mean_q = np.mean([len(q) for q in qs])
    sol_target = max(50.0, bytes_per_row - mean_q - 10)
    writer = None
    chunk = 100_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        qid = (start + np.arange(n)) // per_question
        base = rng.integers(0, len(qs), size=n)
        # lognormal lengths (sigma 0.7) with mean sol_target: a long tail, like real solutions
        want = rng.lognormal(np.log(sol_target) - 0.245, 0.7, size=n).astype(int)
        q_col, a_col, s_col = [], [], []
        for i in range(n):
            q_src = int(qid[i] % len(qs))
            q_col.append(f"{qs[q_src]} (#{qid[i]})")  # distinct question text per group
            j = int(base[i])
            parts, total = [], 0
            while total < want[i]:
                parts.append(sols[j])
                total += len(sols[j]) + 2
                j = (j + 7919) % len(sols)
            s_col.append("\n\n".join(parts)[:max(1, want[i])])
            a_col.append(ans[int(base[i])])
        table = pa.table({"question": q_col, "answer": a_col, "solution": s_col,
                          "is_correct": np.where(rng.random(n) < 0.4, "True", "False")})
        if writer is None:
            writer = pacsv.CSVWriter(str(path), table.schema)
        writer.write_table(table)
    writer.close()


def coverage(tok: Tokenizer, limits=(256, 512, 1024)) -> None:
    enc = Encoder(tok, DEFAULT_PROMPT, max_seq_len=max(limits))
    print(f"\nprompt length in tokens (BOS + DEFAULT_PROMPT), {tok.kind}:")
    print(f"{'file':<20} {'rows':>6} {'p50':>5} {'p90':>5} {'p99':>5} {'max':>6}  "
          + "  ".join(f"<={x:<4}" for x in limits))
    allv = []
    for f in sorted((REPO / "data").glob("*.csv")):
        df, _ = read_table(f)
        v = np.array(enc.prompt_lengths(df.to_dict("records")))
        allv.append(v)
        print(f"{f.name:<20} {len(v):>6} {int(np.median(v)):>5} {int(np.percentile(v, 90)):>5} "
              f"{int(np.percentile(v, 99)):>5} {v.max():>6}  "
              + "  ".join(f"{100 * (v <= x).mean():5.1f}%" for x in limits))
    v = np.concatenate(allv)
    print(f"{'all':<20} {len(v):>6} {int(np.median(v)):>5} {int(np.percentile(v, 90)):>5} "
          f"{int(np.percentile(v, 99)):>5} {v.max():>6}  "
          + "  ".join(f"{100 * (v <= x).mean():5.1f}%" for x in limits))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.data_speed", description=__doc__.split("\n")[0])
    # what to generate
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows in the synthetic CSV")
    ap.add_argument("--bytes-per-row", type=int, default=1500, help="mean CSV bytes per row (contest: ~1.5 KB)")
    ap.add_argument("--per-question", type=int, default=4, help="rows sharing one question")
    ap.add_argument("--csv", help="time this CSV instead of generating one")
    ap.add_argument("--keep", action="store_true", help="keep the generated CSV (prints its path)")
    # what to time
    ap.add_argument("--tokenizer", help="model or tokenizer folder (default: Llama-3 from quicktok)")
    ap.add_argument("--max-seq-len", type=int, default=512, help="token limit per row")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="validation share, split by question")
    ap.add_argument("--tokenize-rows", type=int, default=20_000, help="rows to tokenize for the rate")
    ap.add_argument("--pandas", action="store_true", help="also time pandas.read_csv(dtype=str)")
    ap.add_argument("--coverage", action="store_true", help="only report prompt lengths of data/*.csv")
    ap.add_argument("--seed", type=int, default=0, help="generation and sampler seed")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="data_speed_"))
    try:
        t0 = time.perf_counter()
        tok, tok_name = load_tokenizer(args.tokenizer, tmp)
        t_tok = time.perf_counter() - t0
        print(f"tokenizer: {tok_name}: {tok} (loaded in {t_tok:.1f} s)")
        if args.coverage:
            coverage(tok)
            return

        path = Path(args.csv) if args.csv else tmp / "train.csv"
        if not args.csv:
            t0 = time.perf_counter()
            generate(path, args.rows, args.bytes_per_row, args.per_question, args.seed)
            print(f"generated {path} ({args.rows:,} rows, {path.stat().st_size / 1e9:.2f} GB) "
                  f"in {time.perf_counter() - t0:.0f} s")
        size = path.stat().st_size

        (df, stats), t_read, c_read = timed(read_table, path, require_label=True)
        (train_df, val_df), t_split, c_split = timed(split_by_question, df, args.val_fraction, args.seed)

        def make_sampler():
            enc = Encoder(tok, DEFAULT_PROMPT, args.max_seq_len, loss="answer")
            ds = RowDataset(train_df, enc)
            sampler = LengthGroupedSampler(ds.lengths, args.batch_size, seed=args.seed)
            return enc, ds, sampler, sampler.next_batch()  # next_batch builds epoch 0's order
        (enc, ds, sampler, first), t_sampler, c_sampler = timed(make_sampler)
        batch, t_batch, c_batch = timed(ds.batch, first)
        total = t_read + t_split + t_sampler + t_batch
        cpu = c_read + c_split + c_sampler + c_batch

        print(f"\n{summary(stats)}; {len(train_df):,} train / {len(val_df):,} validation rows")
        print(f"time to first batch: {total:.1f} s wall, {cpu:.1f} s CPU (+ {t_tok:.1f} s tokenizer load)")
        print(f"  read + validate   {t_read:7.2f} s  {c_read:6.2f} s CPU  ({size / 1e6 / t_read:,.0f} MB/s, "
              f"{len(df) / t_read:,.0f} rows/s)")
        print(f"  split by question {t_split:7.2f} s  {c_split:6.2f} s CPU")
        print(f"  lengths + sampler {t_sampler:7.2f} s  {c_sampler:6.2f} s CPU  "
              f"({len(sampler):,} batches of {args.batch_size} per epoch)")
        print(f"  first batch       {t_batch:7.3f} s  {c_batch:6.3f} s CPU  input_ids {tuple(batch['input_ids'].shape)}")

        # Tokenization rate: rows in the order training asks for them (sampler batches).
        n = min(args.tokenize_rows, len(ds))
        positions = []
        while len(positions) < n:
            positions += sampler.next_batch()
        positions = positions[:n]
        rows = train_df.iloc[positions][["question", "answer", "solution", "label"]].to_dict("records")
        exs, t_enc, c_enc = timed(enc.encode_many, rows)
        n_tok = sum(len(e["input_ids"]) for e in exs)
        n_cut = sum(e["truncated"] for e in exs)
        full, t_plain, c_plain = timed(enc.prompt_lengths, rows)
        print(f"\ntokenize {n:,} rows (Encoder.encode_many, max_seq_len {args.max_seq_len}): "
              f"{n / t_enc:,.0f} rows/s ({n / c_enc:,.0f} per CPU-second), {n_tok / t_enc:,.0f} tokens/s "
              f"kept; {100 * n_cut / n:.1f}% truncated")
        print(f"  plain encode_batch of the same prompts (no truncation): {n / t_plain:,.0f} rows/s "
              f"({n / c_plain:,.0f} per CPU-second), {sum(full) / t_plain:,.0f} tokens/s; "
              f"mean {np.mean(full):.0f} tokens/row")
        print(f"  whole table at that rate: {len(df) / (n / t_enc) / 60:.1f} min "
              f"(lazy: each batch is tokenized when the sampler asks for it)")

        if args.pandas:
            _, t_pd, c_pd = timed(pd.read_csv, path, dtype=str, keep_default_na=False)
            print(f"\npandas.read_csv(dtype=str, keep_default_na=False), C engine: {t_pd:.1f} s wall, "
                  f"{c_pd:.1f} s CPU ({size / 1e6 / t_pd:,.0f} MB/s); read_table {t_read:.1f} s, {c_read:.1f} s CPU")
        print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB, "
              f"{os.cpu_count()} CPU(s)")
        if args.keep and not args.csv:
            keep = Path(tempfile.gettempdir()) / "data_speed_train.csv"
            shutil.move(str(path), keep)
            print(f"kept {keep}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
