"""Contest rows -> prompts -> token ids -> length-grouped, right-padded batches.

Rows have the columns question, answer, solution and is_correct (train) or ID / id (test),
in any order, as CSV, Parquet or JSONL. Everything is read as text so "007" stays "007".

Row numbers in messages: "data row N" is 1-based and does not count the header (the first
record under the header is data row 1); JSONL files say "line N" (1-based file line).
The DataFrame index is the 0-based data row, kept through filtering and splitting, and it
is the `index` a batch carries back to the source table.

The prompt is DEFAULT_PROMPT (or a file, `load_prompt`). The model reads BOS + prompt, whose
last token is the cue, and must predict the label token " True" / " False" there; the label
is never an input. Rows too long for max_seq_len lose the middle of their solution first.
"""
from __future__ import annotations

import csv
import io
import json
import math
import string
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# The contest starter's prompt. The text after the last placeholder is the cue: the model's
# next token there is the label (" True" / " False").
DEFAULT_PROMPT = (
    "You are a great mathematician and you are tasked with finding if a solution to a given "
    "maths question is correct or not. Your response should be 'True' if the solution is "
    "correct, otherwise 'False'. Below is the Question and Solution.\n"
    "Question: {question}\n"
    "Solution: {solution}\n"
    "Answer: {answer}\n"
    "Answer is correct (True/False only):"
)
FIELDS = ("question", "answer", "solution")
EMPTY = "(none)"  # shown in place of an empty answer / solution, so the model sees it is empty
CUT = " [...] "  # stands in for the part of a long field that was cut out
IGNORE = -100  # target value that the loss skips
LABELS = {"true": 1, "false": 0, "1": 1, "0": 0, "1.0": 1, "0.0": 0}  # lower-cased, stripped


class DataError(ValueError):
    """Bad input data or template; the message is one line naming the file and row."""


def summary(stats: dict, truncated: int | None = None) -> str:
    """One line: rows read / kept / skipped by reason (/ truncated, once encoded)."""
    s = f"{Path(stats['path']).name}: {stats['rows_total']:,} rows read, {stats['rows_kept']:,} kept"
    if stats["skipped_by_reason"]:
        s += ", skipped " + ", ".join(f"{n:,} {r}" for r, n in stats["skipped_by_reason"].items())
    if truncated is not None:
        s += f", {truncated:,} truncated to fit"
    return s


# ---------------------------------------------------------------------------------------------
# Reading


def read_table(path: str | Path, skip_bad_rows: bool = False,
               require_label: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """Read a contest-schema table (.csv, .parquet, .jsonl) and validate it.

    Args:
        path: the file; the format follows its extension.
        skip_bad_rows: drop rows with a bad label, an empty question, a non-UTF-8 byte or
            a broken record (counted in stats["skipped_by_reason"]) instead of raising.
        require_label: True = train file (is_correct needed), False = test file (ID / id
            needed, is_correct optional), None = either.
    Returns:
        (df, stats). df has the file's columns as strings (answer/solution "" when empty),
        is_correct as bool, `label` (1 True, 0 False, -1 no label) and `_row` (the 0-based
        data row, also the index). stats: path, rows_total (rows parsed), rows_kept, skipped
        (count), skipped_by_reason, id_column ("ID"/"id"/None), has_label, ids (the ID of
        every parsed row, skipped ones included, in file order; None without an ID column).
        A CSV record with the wrong number of fields cannot be parsed: it is counted in
        skipped_by_reason but not in rows_total, and has no ID.
    """
    p = Path(path)
    name = p.name
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise DataError(f"{name}: empty file")
    ext = p.suffix.lower()
    broken = []  # CSV records with the wrong number of fields: pyarrow cannot say which row
    if ext == ".csv":
        df, problems, where, broken = _read_csv(p)
    elif ext in (".parquet", ".pq"):
        df, problems, where = _read_parquet(p)
    elif ext in (".jsonl", ".json", ".ndjson"):
        df, problems, where = _read_jsonl(p)
    else:
        raise DataError(f"{name}: unknown file type {p.suffix!r} (use .csv, .parquet or .jsonl)")
    if len(df) == 0 and not problems and not broken:
        raise DataError(f"{name}: no data rows")

    id_col = "ID" if "ID" in df.columns else ("id" if "id" in df.columns else None)
    has_label = "is_correct" in df.columns
    missing = [c for c in FIELDS if c not in df.columns]
    if require_label is True and not has_label:
        missing.append("is_correct")
    elif require_label is False and id_col is None:
        missing.append("ID")
    elif require_label is None and not has_label and id_col is None:
        missing.append("is_correct (train) or ID (test)")
    if missing:
        raise DataError(f"{name}: missing column(s) {', '.join(missing)}; "
                        f"found: {', '.join(map(str, df.columns))}")

    for c in ("answer", "solution"):
        df[c] = df[c].fillna("")
    df["question"] = df["question"].fillna("")
    if has_label:
        raw_label = df["is_correct"].fillna("").map(str).str.strip().str.lower()
        label = raw_label.map(LABELS)
        unlabelled = (raw_label == "").to_numpy() if require_label is not True and id_col else False
        bad = np.flatnonzero(label.isna().to_numpy() & ~unlabelled)  # a test file may leave it blank
        for i, raw in zip(df.index.to_numpy()[bad], df["is_correct"].to_numpy()[bad]):
            problems.setdefault(int(i), ("bad label", f"is_correct is {raw!r}, expected "
                                                      f"True/False/true/false/1/0"))
        df["label"] = label.fillna(-1).astype(np.int64)
        df["is_correct"] = df["label"] == 1  # only rows with a valid label survive below
    else:
        df["label"] = np.int64(-1)
    for i in df.index.to_numpy()[(df["question"].str.strip() == "").to_numpy()]:
        problems.setdefault(int(i), ("empty question", "the question is empty"))
    if id_col is not None:
        df[id_col] = df[id_col].fillna("")
        for i in df.index.to_numpy()[(df[id_col].map(str).str.strip() == "").to_numpy()]:
            problems.setdefault(int(i), ("empty ID", f"{id_col} is empty"))

    df["_row"] = df.index.to_numpy()
    stats = {"path": str(p), "rows_total": len(df), "rows_kept": 0, "skipped": 0,
             "skipped_by_reason": {}, "id_column": id_col, "has_label": has_label,
             "ids": [str(x) for x in df[id_col].tolist()] if id_col else None}
    if (problems or broken) and not skip_bad_rows:
        hint = "; pass skip_bad_rows (--skip-bad-rows) to drop bad rows"
        n_bad = len(problems) + len(broken)
        more = f" ({n_bad - 1} more bad rows)" if n_bad > 1 else ""
        if broken:  # pyarrow skipped it, so the Python csv module finds its row number
            raise DataError(f"{name}: {_broken_row(p)}{broken[0]}{more}{hint}")
        row = min(problems)
        raise DataError(f"{name}: {where(row)}: {problems[row][1]}{more}{hint}")
    by_reason = stats["skipped_by_reason"]
    for reason, _ in problems.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    if broken:
        by_reason["broken record"] = len(broken)
    if problems:  # (a drop copies every column, so only when there is something to drop)
        df = df.drop(index=list(problems))
    stats["rows_kept"], stats["skipped"] = len(df), sum(by_reason.values())
    if len(df) == 0:
        raise DataError(f"{name}: no usable rows left ({summary(stats)})")
    return df, stats


def _read_csv(p: Path):
    """pyarrow's multi-threaded reader, every column as text; a non-UTF-8 byte falls back to a
    slower byte-wise read that finds the row. Returns (df, problems, where, broken): problems
    maps a 0-based row to (reason, message); broken lists records pyarrow could not split."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    name = p.name
    with open(p, "rb") as f:
        first = f.readline()
    try:
        header = next(csv.reader(io.StringIO(first.decode("utf-8-sig"))), [])
    except UnicodeDecodeError:
        raise DataError(f"{name}: line 1 (the header) is not UTF-8 text") from None
    if not any(c.strip() for c in header):
        raise DataError(f"{name}: empty file (no header line)")
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DataError(f"{name}: duplicate column(s) {', '.join(dupes)}")

    broken = []
    def on_bad(row):
        broken.append(f"a record has {row.actual_columns} fields, expected "
                      f"{row.expected_columns}: {row.text[:80]!r}")
        return "skip"
    parse = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_bad)
    problems = {}
    try:
        conv = pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                    strings_can_be_null=False)
        table = pacsv.read_csv(p, parse_options=parse, convert_options=conv)
        df = _to_pandas(table)
    except pa.ArrowInvalid as e:
        if "UTF8" not in str(e):
            raise DataError(f"{name}: cannot parse CSV ({str(e).splitlines()[0]})") from None
        broken.clear()
        conv = pacsv.ConvertOptions(column_types={c: pa.binary() for c in header})
        table = pacsv.read_csv(p, parse_options=parse, convert_options=conv)
        cols = {}
        for c in header:
            vals = table.column(c).to_pylist()
            out = []
            for i, v in enumerate(vals):
                try:
                    out.append(v.decode("utf-8"))
                except UnicodeDecodeError as u:
                    problems.setdefault(i, ("non-UTF-8", f"column {c} has a non-UTF-8 byte "
                                            f"0x{v[u.start]:02x} at byte {u.start + 1}"))
                    out.append(v.decode("utf-8", errors="replace"))
            cols[c] = out
        df = pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in cols.items()})
    return df, problems, lambda i: f"data row {i + 1} (1-based, header not counted)", broken


def _broken_row(p: Path) -> str:
    """'data row N: ' of the first CSV record whose field count differs from the header's."""
    with open(p, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f)
        width = len(next(reader, []))
        n = 0
        for rec in reader:
            n += bool(rec)  # pyarrow skips blank lines too
            if rec and len(rec) != width:
                return f"data row {n} (1-based, header not counted): "
    return ""


def _to_pandas(data) -> pd.DataFrame | pd.Series:
    """Arrow text -> pandas columns of Python str (object dtype), not Arrow-backed strings.

    Selecting rows of an Arrow-backed column copies its text: on a 1.5 GB table, dropping bad
    rows and splitting off validation cost ~10 s each that way, ~0.1 s with object columns
    (which copy pointers); the conversion itself costs ~2 s once."""
    if hasattr(data, "column_names"):  # a Table
        return pd.DataFrame({c: _to_pandas(data.column(c)) for c in data.column_names})
    return pd.Series(data.to_numpy(zero_copy_only=False), dtype=object)


def _read_parquet(p: Path):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{p.name}: cannot read Parquet ({str(e).splitlines()[0]})") from None
    problems = {}
    cols = {}
    for c in table.column_names:
        col = table.column(c)
        if c not in FIELDS + ("is_correct", "ID", "id"):
            cols[c] = col.to_pandas()  # extra columns keep their type
            continue
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            out = []
            for i, v in enumerate(col.to_pylist()):
                try:
                    out.append("" if v is None else v.decode("utf-8"))
                except UnicodeDecodeError:
                    problems.setdefault(i, ("non-UTF-8", f"column {c} is not UTF-8 text"))
                    out.append(v.decode("utf-8", errors="replace"))
            cols[c] = pd.Series(out, dtype=object)
        elif pa.types.is_boolean(col.type):
            cols[c] = pd.Series(["" if v is None else str(v) for v in col.to_pylist()], dtype=object)
        else:
            cols[c] = _to_pandas(pc.fill_null(pc.cast(col, pa.string()), ""))
    return pd.DataFrame(cols), problems, lambda i: f"data row {i + 1} (1-based)"


def _read_jsonl(p: Path):
    rows, lines, problems = [], [], {}
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            i = len(rows)
            lines.append(lineno)
            try:
                r = json.loads(raw.decode("utf-8"))
                if not isinstance(r, dict):
                    raise ValueError("not a JSON object")
            except UnicodeDecodeError as u:
                problems[i] = ("non-UTF-8", f"non-UTF-8 byte 0x{raw[u.start]:02x} at byte {u.start + 1}")
                r = {}
            except ValueError as e:
                problems[i] = ("bad JSON", f"not a JSON object ({e})")
                r = {}
            rows.append(r)
    if not rows:
        raise DataError(f"{p.name}: empty file")

    def text(v):
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        if isinstance(v, (list, dict)):
            return json.dumps(v, ensure_ascii=False)
        return str(v)  # bool -> "True"/"False", int -> "7"

    names = list(dict.fromkeys(k for r in rows for k in r))
    df = pd.DataFrame({c: pd.Series([text(r.get(c)) for r in rows], dtype=object) for c in names})
    return df, problems, lambda i: f"line {lines[i]}"


def split_by_question(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows so that all rows sharing a question (stripped text) land on the same side.

    Questions are shuffled with `seed` and moved to validation until it holds about
    val_fraction of the rows. Same df + seed -> same split. Indexes are kept."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    key = df["question"].map(str).str.strip()
    codes, uniq = pd.factorize(key)  # question number per row, in first-appearance order
    if val_fraction == 0 or len(uniq) < 2:
        return df, df.iloc[:0]
    counts = np.bincount(codes, minlength=len(uniq))
    order = np.random.default_rng(seed).permutation(len(uniq))
    target = max(1, round(val_fraction * len(df)))
    k = int(np.searchsorted(np.cumsum(counts[order]), target)) + 1
    k = min(k, len(uniq) - 1)  # keep at least one question for training
    in_val = np.zeros(len(uniq), dtype=bool)
    in_val[order[:k]] = True
    mask = in_val[codes]
    return df[~mask], df[mask]


def char_lengths(df: pd.DataFrame) -> np.ndarray:
    """Cheap length proxy for bucketing: characters of question + solution + answer."""
    def n(col):
        s = df[col]
        if s.dtype == object:  # read_table's columns: map(len) beats .str.len() by ~4x
            try:
                return np.fromiter(map(len, s.to_numpy()), np.int64, len(s))
            except TypeError:  # a non-string value (NaN) somewhere
                pass
        return s.str.len().fillna(0).to_numpy(np.int64)
    return n("question") + n("solution") + n("answer")


# ---------------------------------------------------------------------------------------------
# Prompt


def parse_template(template: str, source: str = "template") -> list[tuple[str, str | None]]:
    """Split a template into (literal text, field or None) pieces, checking it.

    Placeholders are {question} {answer} {solution}; write {{ and }} for literal braces.
    The text after the last placeholder is the cue and must not be blank."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"{source}: {e} (write {{{{ and }}}} for literal braces)") from None
    pieces = []
    for literal, fld, spec, conv in parts:
        if fld is not None and (fld not in FIELDS or spec or conv):
            shown = "{" + fld + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise DataError(f"{source}: unknown placeholder {shown}; use {{question}} {{answer}} "
                            f"{{solution}} (and {{{{ }}}} for literal braces)")
        pieces.append((literal, fld))
    if not any(f == "question" for _, f in pieces):
        raise DataError(f"{source}: the template has no {{question}} placeholder")
    last = pieces[-1]
    if last[1] is not None or not last[0].strip():
        raise DataError(f"{source}: the template must end with the cue text after the last "
                        f"placeholder, e.g. 'Answer is correct (True/False only):'")
    return pieces


def load_prompt(path: str | Path) -> str:
    """Read a prompt template file (one trailing newline is dropped, so the cue ends the text)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read prompt template ({e})") from None
    text = text[:-1] if text.endswith("\n") else text
    text = text[:-1] if text.endswith("\r") else text
    parse_template(text, str(p))
    return text


# ---------------------------------------------------------------------------------------------
# Tokenizing


def _cut_middle(text: str, keep: int) -> str:
    """Keep about `keep` characters: the head and the tail, cut at spaces near the boundary."""
    if keep >= len(text):
        return text
    h, t = keep - keep // 2, keep // 2
    head, tail = text[:h], text[len(text) - t:] if t else ""
    j = head.rfind(" ", max(0, h - 20))
    head = head[:j] if j > 0 else head
    j = tail.find(" ", 0, 20)
    tail = tail[j + 1:] if j >= 0 else tail
    return head.rstrip() + CUT + tail.lstrip()


def _cut_end(text: str, keep: int) -> str:
    if keep >= len(text):
        return text
    head = text[:keep]
    j = head.rfind(" ", max(0, keep - 20))
    return (head[:j] if j > 0 else head).rstrip() + CUT.rstrip()


class Encoder:
    """Row -> {input_ids, targets, label, truncated}, at most max_seq_len tokens.

    A row that fits is the tokenizer's encoding of BOS + the rendered prompt, exactly. A row
    that does not is cut at the text level and re-encoded until it fits: first the middle of
    the solution (head and tail stay, CUT marks the gap), then the end of the question, and
    only if the template with a bare question still overflows, the middle of the answer.
    Cutting text and re-encoding (rather than splicing token lists) keeps the ids identical
    to what the tokenizer gives for the final prompt string.
    """

    def __init__(self, tokenizer, template: str = DEFAULT_PROMPT, max_seq_len: int = 512,
                 loss: str = "answer"):
        if loss not in ("answer", "full"):
            raise ValueError(f"loss must be 'answer' or 'full', got {loss!r}")
        self.tok = tokenizer
        self.template = template
        self.pieces = parse_template(template)
        self.max_seq_len = max_seq_len
        self.loss = loss
        self.true_id, self.false_id = tokenizer.label_ids()
        floor = len(self._bare("x")) + 8  # the most-cut row, plus room for some question
        if floor > max_seq_len:
            raise DataError(f"max_seq_len={max_seq_len} is too small: the prompt template alone "
                            f"needs about {floor} tokens")

    def render(self, question: str, answer: str, solution: str) -> str:
        vals = {"question": question or EMPTY, "answer": answer or EMPTY, "solution": solution or EMPTY}
        return "".join(lit + (vals[f] if f else "") for lit, f in self.pieces)

    def _bare(self, q: str) -> list[int]:
        """The last resort: the question's first character, every other field cut out."""
        return self._ids(q[:1] + CUT.rstrip(), CUT.strip(), CUT.strip())

    def _ids(self, q: str, a: str, s: str) -> list[int]:
        return self.tok.encode(self.render(q, a, s), bos=True)

    def _shrink(self, build, text: str, n_tok: int, budget: int, cut) -> list[int] | None:
        """Cut `text` (n_tok tokens) with cut(text, chars) until build(cut text) fits, aiming
        at `budget` tokens for it; None if it never fits."""
        n_tok = max(1, n_tok)
        keep = _first_keep(budget)
        while keep > 0:
            ids = build(cut(text, int(len(text) * keep / n_tok)))
            if len(ids) <= self.max_seq_len:
                return ids
            keep -= len(ids) - self.max_seq_len + 1 + keep // 16  # uneven density: step faster
        return None

    def fit(self, question: str, answer: str, solution: str,
            ids: list[int] | None = None) -> tuple[list[int], bool]:
        """(ids, truncated): BOS + prompt ids, cut to max_seq_len as the class docstring says.
        `ids`, if given, is the untruncated encoding (saves encoding it again)."""
        L = self.max_seq_len
        ids = self._ids(question, answer, solution) if ids is None else ids
        if len(ids) <= L:
            return ids, False
        q, a, s = question, answer, solution
        if s.strip():
            # The row with its whole solution cut out tells what the solution costs and what
            # it may keep, without encoding the (long) solution on its own.
            without = self._ids(q, a, CUT.strip())
            if len(without) <= L:
                got = self._shrink(lambda x: self._ids(q, a, x), s, len(ids) - len(without),
                                   L - len(without), _cut_middle)
                return (without if got is None else got), True
            s, ids = CUT.strip(), without
        n_q = len(self.tok.encode(q))
        got = self._shrink(lambda x: self._ids(x, a, s), q, n_q, n_q - (len(ids) - L) - 4, _cut_end)
        if got is not None:
            return got, True
        q = q[:20].rstrip() + CUT.rstrip()  # the question's very start still comes first
        ids = self._ids(q, a, s)
        if len(ids) <= L:
            return ids, True
        n_a = len(self.tok.encode(a))
        got = self._shrink(lambda x: self._ids(q, x, s), a, n_a, n_a - (len(ids) - L) - 4, _cut_middle)
        if got is not None:
            return got, True
        ids = self._bare(question)
        if len(ids) > L:  # __init__ left 8 tokens of room, so only an exotic first character gets here
            raise DataError(f"max_seq_len={L} cannot hold this row even with every field cut")
        return ids, True

    def _example(self, ids: list[int], label: int, truncated: bool) -> dict:
        label_tok = self.true_id if label == 1 else self.false_id if label == 0 else IGNORE
        if self.loss == "answer":
            targets = [IGNORE] * (len(ids) - 1) + [label_tok]
        else:  # full: every next token of the prompt, then the label at the cue
            targets = ids[1:] + [label_tok]
        return {"input_ids": ids, "targets": targets, "label": int(label), "truncated": truncated}

    def encode(self, row) -> dict:
        """row: mapping with question, answer, solution and optionally label (1/0/-1) or
        is_correct. Returns dict(input_ids, targets, label, truncated)."""
        return self.encode_many([row])[0]

    def encode_many(self, rows) -> list[dict]:
        """encode() over many rows, with the same result, in batch tokenizer calls (which run
        in parallel): all rows, then for the long ones the solution-less row and the first
        cut; only rows whose first cut still overflows go through fit() one by one."""
        L = self.max_seq_len
        qas = [(str(r["question"]), str(r["answer"]), str(r["solution"])) for r in rows]
        ids_list = self.tok.encode_batch([self.render(*x) for x in qas], bos=True)
        long = [k for k, ids in enumerate(ids_list) if len(ids) > L and qas[k][2].strip()]
        without = self.tok.encode_batch([self.render(qas[k][0], qas[k][1], CUT.strip()) for k in long], bos=True)
        tries = {}  # row -> its solution with the middle cut, as fit()'s first try makes it
        for k, w in zip(long, without):
            keep = _first_keep(L - len(w))
            if len(w) <= L and keep > 0:
                s = qas[k][2]
                tries[k] = _cut_middle(s, int(len(s) * keep / max(1, len(ids_list[k]) - len(w))))
        tried = self.tok.encode_batch([self.render(qas[k][0], qas[k][1], tries[k]) for k in tries], bos=True)
        done = {k: ids for k, ids in zip(tries, tried) if len(ids) <= L}
        out = []
        for k, (r, ids) in enumerate(zip(rows, ids_list)):
            truncated = len(ids) > L
            if truncated:
                ids = done[k] if k in done else self.fit(*qas[k], ids=ids)[0]
            out.append(self._example(ids, _row_label(r), truncated))
        return out

    def prompt_lengths(self, rows) -> list[int]:
        """Untruncated token counts (BOS + prompt) of rows: what max_seq_len must cover."""
        texts = [self.render(str(r["question"]), str(r["answer"]), str(r["solution"])) for r in rows]
        return [len(ids) for ids in self.tok.encode_batch(texts, bos=True)]


def _first_keep(budget: int) -> int:
    """Tokens of a field to aim for when `budget` are free: a little under, so the first cut
    usually fits despite uneven token density."""
    return int(budget * 0.97) - 1


def _row_label(r) -> int:
    if "label" in r:
        v = r["label"]
        return -1 if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
    if "is_correct" in r:
        return LABELS.get(str(r["is_correct"]).strip().lower(), -1)
    return -1


# ---------------------------------------------------------------------------------------------
# Batching


class LengthGroupedSampler:
    """Batches of row positions with similar lengths, in a seeded, resumable, infinite order.

    Each epoch: permute all rows (seed + epoch), cut into mega-batches of `mega_batches`
    batches, sort each mega-batch by length (longest first), cut into batches, shuffle the
    batch order. Batches are homogeneous in length (little padding) yet the order is random.
    shuffle=False sorts the whole set by length, longest first (for scoring).
    With world_size > 1 every rank walks the same global order and takes every
    world_size-th batch starting at `rank`; the tail that would give ranks unequal counts is
    dropped, so all ranks take the same number of steps.
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, mega_batches: int = 64):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.mega_batches = mega_batches
        self.epoch, self.position = 0, 0
        self._cached = (None, None)
        if len(self) == 0:
            raise ValueError(f"{len(self.lengths)} rows give no batch of {batch_size} "
                             f"for each of {world_size} rank(s)")

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        n, bs = len(self.lengths), self.batch_size
        total = n // bs if self.drop_last else -(-n // bs)
        return total // self.world_size

    def _global(self, epoch: int) -> list[np.ndarray]:
        bs = self.batch_size
        if self.shuffle:
            rng = np.random.default_rng(self.seed + epoch)
            perm = rng.permutation(len(self.lengths))
            mega = bs * self.mega_batches
            batches = []
            for s in range(0, len(perm), mega):
                chunk = perm[s:s + mega]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                batches += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
        else:
            rng = None
            order = np.argsort(-self.lengths, kind="stable")
            batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        if self.drop_last and len(batches[-1]) < bs:
            batches.pop()  # only the last one can be short
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order."""
        if self._cached[0] != epoch:
            g = self._global(epoch)
            mine = g[self.rank:len(self) * self.world_size:self.world_size]
            self._cached = (epoch, [b.tolist() for b in mine])
        return self._cached[1]

    def next_batch(self) -> list[int]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.epoch_batches(self.epoch)[self.position]
        self.position += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._cached = (None, None)


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad examples into the batch dict the trainer and predictor consume."""
    B = len(examples)
    T = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        targets[b, :n] = torch.tensor(e["targets"], dtype=torch.long)
        mask[b, :n] = True
    return {
        "input_ids": input_ids,  # (B, T)
        "attention_mask": mask,  # (B, T) True on real tokens
        "targets": targets,  # (B, T) -100 where no loss
        "cue_pos": mask.sum(1) - 1,  # (B,) last real token = the cue
        "label": torch.tensor([e["label"] for e in examples], dtype=torch.long),  # (B,)
        "index": torch.tensor([e.get("index", -1) for e in examples], dtype=torch.long),  # (B,)
    }


class RowDataset:
    """A table's rows, tokenized lazily (with a small LRU cache) when a batch asks for them.

    Positions are 0..len-1 in df's order. Each example's `index` is the source table's data
    row: df's `_row` column (read_table adds it) or else df's index. `lengths` is the cheap
    character-length proxy per position, for LengthGroupedSampler. `stats` counts the rows
    encoded so far and how many of them were truncated."""

    def __init__(self, df: pd.DataFrame, encoder: Encoder, pad_id: int | None = None,
                 cache_size: int = 4096):
        self.df = df
        self.source_rows = df["_row"].to_numpy() if "_row" in df.columns else df.index.to_numpy()
        self.encoder = encoder
        self.pad_id = encoder.tok.pad_id if pad_id is None else pad_id
        self.lengths = char_lengths(df)
        self.cache_size = cache_size
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._seen = np.zeros(len(df), dtype=bool)
        self._truncated = np.zeros(len(df), dtype=bool)

    def __len__(self) -> int:
        return len(self.df)

    def get_batch(self, positions) -> list[dict]:
        positions = [int(i) for i in positions]
        missing = [i for i in dict.fromkeys(positions) if i not in self._cache]
        if missing:
            rows = self.df.iloc[missing][["question", "answer", "solution", "label"]].to_dict("records")
            for i, ex in zip(missing, self.encoder.encode_many(rows)):
                ex["index"] = int(self.source_rows[i])
                self._seen[i] = True
                self._truncated[i] = ex["truncated"]
                self._cache[i] = ex
        out = []
        for i in positions:
            self._cache.move_to_end(i)
            out.append(self._cache[i])
        while len(self._cache) > max(self.cache_size, len(positions)):
            self._cache.popitem(last=False)
        return out

    def __getitem__(self, i: int) -> dict:
        return self.get_batch([i])[0]

    def batch(self, positions) -> dict:
        """collate(get_batch(positions)) with the tokenizer's pad id."""
        return collate(self.get_batch(positions), self.pad_id)

    @property
    def stats(self) -> dict:
        return {"rows": len(self), "encoded": int(self._seen.sum()),
                "truncated": int(self._truncated.sum())}
