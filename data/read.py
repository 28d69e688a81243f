"""Reading contest rows: CSV, Parquet or JSONL with question, answer, solution and is_correct
(train) or ID / id (test), in any column order. Everything is read as text so "007" stays "007".

Row numbers in messages: "data row N" is 1-based and does not count the header (the first
record under the header is data row 1); JSONL files say "line N" (1-based file line).
The DataFrame index (and its `_row` column) is the 0-based data row, kept through filtering and
splitting: predict.py writes each row's line of the submission there.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError

FIELDS = ("question", "answer", "solution")
LABELS = {"true": 1, "false": 0, "1": 1, "0": 0, "1.0": 1, "0.0": 0}  # lower-cased, stripped


class DataError(UserError, ValueError):
    """Bad input data or template; the message is one line naming the file and row."""


def summary(stats: dict, truncated: int | None = None) -> str:
    """One line: rows read / kept / skipped by reason (/ truncated, once encoded)."""
    s = f"{Path(stats['path']).name}: {stats['rows_total']:,} rows read, {stats['rows_kept']:,} kept"
    if stats["skipped_by_reason"]:
        s += ", skipped " + ", ".join(f"{n:,} {r}" for r, n in stats["skipped_by_reason"].items())
    if truncated is not None:
        s += f", {truncated:,} truncated to fit"
    return s


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
        if id_col is not None:  # keep a broken record's ID, if readable, so it still gets a line
            ids, positions = _ids_with_broken_records(p, id_col, len(df))
            if positions is not None:
                stats["ids"], stats["rows_total"] = ids, len(ids)
                stats["broken_ids"] = len(ids) - len(df)
                df["_row"] = positions
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


def _ids_with_broken_records(p: Path, id_col: str, n_parsed: int) -> tuple[list[str], np.ndarray | None]:
    """With broken CSV records: (the ID of every record whose ID field is readable, parsed or
    broken, in file order; each parsed row's position in that list). positions is None when the
    csv module and pyarrow disagree on the records (then broken records keep no line)."""
    with open(p, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        col, width = header.index(id_col), len(header)
        ids, positions = [], []
        for rec in reader:
            if not rec:
                continue  # pyarrow skips blank lines too
            if len(rec) == width:
                positions.append(len(ids))
                ids.append(rec[col])
            elif col < len(rec) and rec[col].strip():
                ids.append(rec[col])
    if len(positions) != n_parsed:
        return ids, None
    return ids, np.asarray(positions)


def _to_pandas(data) -> pd.DataFrame | pd.Series:
    """Arrow text -> pandas columns of Python str (object dtype), not Arrow-backed strings.

    Selecting rows of an Arrow-backed column copies its text, while an object column copies
    pointers: dropping bad rows and splitting off validation stay cheap on a 1M-row table."""
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
        if pa.types.is_nested(col.type) or pa.types.is_dictionary(col.type) and pa.types.is_nested(col.type.value_type):
            raise DataError(f"{p.name}: column {c} holds {col.type}, expected text (or numbers, booleans)")
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
            try:
                cols[c] = _to_pandas(pc.fill_null(pc.cast(col, pa.string()), ""))
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                raise DataError(f"{p.name}: column {c} holds {col.type}, which cannot be read as text") from None
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


def question_codes(df: pd.DataFrame) -> tuple[np.ndarray, int]:
    """(question number of each row, in first-appearance order; number of questions): rows with
    the same question text (stripped) share a number."""
    codes, uniq = pd.factorize(df["question"].map(str).str.strip())
    return codes, len(uniq)


def split_by_question(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows so that all rows sharing a question (stripped text) land on the same side.

    Questions are shuffled with `seed` and moved to validation until it holds about
    val_fraction of the rows. Same df + seed -> same split. Indexes are kept."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    codes, n = question_codes(df)
    if val_fraction == 0 or n < 2:
        return df, df.iloc[:0]
    counts = np.bincount(codes, minlength=n)
    order = np.random.default_rng(seed).permutation(n)
    target = max(1, round(val_fraction * len(df)))
    k = int(np.searchsorted(np.cumsum(counts[order]), target)) + 1
    k = min(k, n - 1)  # keep at least one question for training
    in_val = np.zeros(n, dtype=bool)
    in_val[order[:k]] = True
    mask = in_val[codes]
    return df[~mask], df[mask]
