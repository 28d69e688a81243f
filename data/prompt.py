"""Prompt and token ids: each row becomes BOS + the rendered template, whose last token is the
cue; the target is the label token (" True" / " False") that follows it, never an input. Rows
too long for max_seq_len lose the middle of their solution first.
"""
from __future__ import annotations

import math
import string
from pathlib import Path

from data.read import FIELDS, LABELS, DataError

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
EMPTY = "(none)"  # shown in place of an empty answer / solution, so the model sees it is empty
CUT = " [...] "  # stands in for the part of a long field that was cut out
IGNORE = -100  # target value that the loss skips


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
