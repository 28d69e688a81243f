"""Tokenizer: one interface over the three tokenizer files a Llama-family folder can hold.

  tokenizer.json            Hugging Face `tokenizers` (Llama 3 / 3.1 / 3.2, SmolLM2, TinyLlama)
  original/tokenizer.model  Meta's tiktoken-format BPE ranks (lines "base64(token bytes) rank");
                            rebuilt here as a `tokenizers` byte-level BPE, no tiktoken needed
  tokenizer.model           sentencepiece (Llama 2, TinyLlama)

`from_dir` prefers them in that order. BOS/EOS/pad are decided in one place (`_special_ids`),
from tokenizer_config.json, config.json and generation_config.json where present. A
tokenizer.json post-processor that adds BOS by itself is never used: we always encode without
it and add BOS ourselves, so BOS appears exactly once.

Text is always encoded as plain text: a literal "<|eot_id|>" inside a math question becomes
ordinary tokens, never a control token (tiktoken's encode_ordinary behaviour).
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from common.errors import UserError


class TokenizerError(UserError, ValueError):
    """A tokenizer file we cannot read, or one without what the task needs (single-token labels)."""


class TokenizerFileNotFound(UserError, FileNotFoundError):
    """A model folder without any tokenizer file."""


# Llama 3's pre-tokenizer split (Meta's tokenizer.py and HF's tokenizer.json use the same one).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256  # ids 128000..128255 follow the 128,000 BPE ranks
LABEL_PIECES = (" True", " False")  # the label tokens follow the prompt's cue


def llama3_special_names() -> list[str]:
    """The 256 special-token names of Meta's Llama 3.1 tokenizer, in id order from 128000.

    Llama 3.0 calls 128004 / 128008 / 128010 reserved tokens where 3.1 (and 3.2/3.3) names
    them <|finetune_right_pad_id|>, <|eom_id|>, <|python_tag|>; the ids are the same, and the
    tiktoken file does not hold names, so we always use 3.1's (only the pad choice differs).
    """
    head = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
            "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return head + [f"<|reserved_special_token_{3 + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(head))]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, used by every byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def is_tiktoken_file(path: str | Path) -> bool:
    """True if the file's first line is "base64 rank" (Meta's format), not sentencepiece protobuf."""
    with open(path, "rb") as f:
        line = f.readline(512).strip()
    parts = line.split(b" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Meta's original/tokenizer.model: one "base64(token bytes) rank" per line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path}: line {lineno} is not 'base64token rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


def tiktoken_to_tokenizers(ranks: dict[bytes, int], special_names: list[str],
                           pattern: str = LLAMA3_PATTERN):
    """Build a `tokenizers` byte-level BPE that encodes exactly like tiktoken with these ranks.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. A
    BPE merge list ordered by the merged token's rank does the same, provided every split of
    a token into two tokens is listed (all at that token's position). ignore_merges=True
    mirrors tiktoken's shortcut of emitting a whole pre-token that is itself in the vocabulary.
    (Same construction as transformers' TikTokenConverter, which the tests compare against.)
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    table = bytes_to_unicode()  # str.translate table: a latin-1 code point is the byte value
    text = {tok: tok.decode("latin-1").translate(table) for tok in ranks}  # vocabulary spelling

    vocab, merges = {}, []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[text[tok]] = rank
        splits = [(ranks[tok[:i]], ranks[tok[i:]], i) for i in range(1, len(tok))
                  if tok[:i] in ranks and tok[i:] in ranks]
        splits.sort()
        merges += [(text[tok[:i]], text[tok[i:]]) for _, _, i in splits]
    tk = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in special_names])
    if tk.token_to_id(special_names[0]) != len(ranks):
        raise TokenizerError("special tokens did not land right after the BPE ranks")
    return tk


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: not a JSON object")
    return obj


class _HFBackend:
    """tokenizer.json or rebuilt tiktoken ranks, through the `tokenizers` library."""

    def __init__(self, tk):
        self.tk = tk
        tk.encode_special_tokens = True  # "<|eot_id|>" in data is text, not a control token
        self.added = {t.content: i for i, t in tk.get_added_tokens_decoder().items()}
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        fast = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)  # no offsets: faster
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def lookup(self, name: str) -> int | None:
        """Id of a vocabulary entry spelled as stored (special tokens, '<s>'), else None."""
        return self.added.get(name, self.tk.token_to_id(name))

    def template_bos(self) -> int | None:
        """The id the post-processor puts in front, if its template adds one (Llama 3's does)."""
        with_pp = self.tk.encode("a", add_special_tokens=True).ids
        plain = self.tk.encode("a", add_special_tokens=False).ids
        if len(with_pp) > len(plain) and with_pp[1:len(plain) + 1] == plain:
            return with_pp[0]
        return None


class _SPBackend:
    """A sentencepiece tokenizer.model (Llama 2 / TinyLlama)."""

    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def lookup(self, name: str) -> int | None:
        # Pieces spell spaces as U+2581; piece_to_id returns unk for unknown pieces.
        piece = name.replace(" ", "\u2581")
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None


class Tokenizer:
    """Text <-> ids for one model, with that model's BOS/EOS/pad.

    Attributes: bos_id, eos_id, pad_id, vocab_size, add_bos (whether the family puts BOS in
    front of a sequence: True for Llama 2/3, False for SmolLM2), kind ("tokenizer.json",
    "tiktoken", "sentencepiece"), path.
    """

    def __init__(self, backend, bos_id: int | None, eos_id: int, pad_id: int, add_bos: bool,
                 kind: str = "", path: str = ""):
        if add_bos and bos_id is None:
            raise TokenizerError(f"{path}: this tokenizer adds BOS but no BOS id could be found")
        self._b = backend
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
        self.vocab_size = backend.vocab_size
        self.kind, self.path = kind, path

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load from a model folder (or one tokenizer file): tokenizer.json, else
        original/tokenizer.model (tiktoken, detected by content), else tokenizer.model."""
        p = Path(path)
        if p.is_file():
            d, files = p.parent, [p]
            if d.name == "original":
                d = d.parent
        else:
            d = p
            files = [p / "tokenizer.json", p / "original" / "tokenizer.model", p / "tokenizer.model"]
        for f in files:
            if not f.is_file():
                continue
            if f.suffix == ".json":
                from tokenizers import Tokenizer as HFTokenizer
                try:
                    backend = _HFBackend(HFTokenizer.from_file(str(f)))
                except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                    raise TokenizerError(f"{f}: cannot read tokenizer.json ({e})") from None
                return cls._finish(backend, d, "tokenizer.json", f)
            if is_tiktoken_file(f):
                backend = _tiktoken_backend(f)
                return cls._finish(backend, d, "tiktoken", f, llama3=_llama3_version(d))
            return cls._finish(_SPBackend(f), d, "sentencepiece", f)
        raise TokenizerFileNotFound(f"{path}: no tokenizer.json, original/tokenizer.model or "
                                f"tokenizer.model found")

    @classmethod
    def _finish(cls, backend, d: Path, kind: str, f: Path, llama3: str = "") -> "Tokenizer":
        bos, eos, pad, add_bos = _special_ids(backend, d, kind, llama3)
        return cls(backend, bos, eos, pad, add_bos, kind=kind, path=str(f))

    # -- encoding -------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text` (plain text: special-token names are not parsed).

        bos=True puts BOS in front once, when this family uses one (see `add_bos`)."""
        ids = self._b.encode(text)
        return [self.bos_id] + ids if bos and self.add_bos else ids

    def encode_batch(self, texts: list[str], bos: bool = False) -> list[list[int]]:
        """encode() over many texts; the `tokenizers` path runs them in parallel in Rust."""
        out = self._b.encode_batch(list(texts))
        if bos and self.add_bos:
            out = [[self.bos_id] + ids for ids in out]
        return out

    def decode(self, ids) -> str:
        """Text of `ids` (special tokens are kept as their names, except sentencepiece's)."""
        return self._b.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int:
        """The id of `piece` as one token, as it reads inside running text (" True" is the
        word True after a space). Special-token names ("<|eot_id|>") are looked up directly.
        Raises ValueError naming the piece if it is not exactly one token."""
        i = self._b.lookup(piece) if isinstance(self._b, _SPBackend) else self._b.added.get(piece)
        if i is not None:
            return i
        if isinstance(self._b, _SPBackend):
            raise TokenizerError(f"{piece!r} is not one token of this sentencepiece vocabulary")
        ids = self._b.encode(piece)
        if len(ids) == 1:
            return ids[0]
        # A tokenizer.json that marks word starts (Llama 2 / TinyLlama: "▁" prepended) splits
        # " True" standing alone into "▁" + "▁True"; after other text it is one token.
        base, ctx = self._b.encode("a:"), self._b.encode("a:" + piece)
        if len(ctx) == len(base) + 1 and ctx[:len(base)] == base:
            return ctx[-1]
        raise TokenizerError(f"{piece!r} is not one token: it encodes to {len(ids)} tokens {ids}")

    def label_ids(self) -> tuple[int, int]:
        """(id of " True", id of " False"): the tokens the model predicts after the cue."""
        out = []
        for piece in LABEL_PIECES:
            try:
                out.append(self.token_id(piece))
            except ValueError as e:
                raise TokenizerError(f"label {piece!r} must be a single token for this tokenizer "
                                 f"({self.path}), but: {e}") from None
        return out[0], out[1]

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, bos={self.bos_id}"
                f"{'' if self.add_bos else ' (not added)'}, eos={self.eos_id}, pad={self.pad_id})")


_TIKTOKEN_CACHE: dict[str, "_HFBackend"] = {}


def _tiktoken_backend(path: Path) -> "_HFBackend":
    """Building the BPE from 128k ranks takes seconds of Python; a process that loads the same
    file twice (train then score, or tests) pays it once. Keyed by content, not path."""
    key = hashlib.sha256(path.read_bytes()).hexdigest()
    if key not in _TIKTOKEN_CACHE:
        _TIKTOKEN_CACHE.clear()  # keep at most one 128k-token vocabulary alive
        _TIKTOKEN_CACHE[key] = _HFBackend(
            tiktoken_to_tokenizers(read_tiktoken_ranks(path), llama3_special_names()))
    return _TIKTOKEN_CACHE[key]


def _llama3_version(d: Path) -> str:
    """"3.0" when the folder's config says Llama 3.0 (no llama3 RoPE scaling), else "3.1".

    Meta's tiktoken file is identical across 3.0 and 3.1; only the pad choice depends on it
    (3.0 has no pad token, so it pads with EOS)."""
    params = _read_json(d / "original" / "params.json") or _read_json(d / "params.json")
    if params:
        return "3.1" if params.get("use_scaled_rope") else "3.0"
    cfg = _read_json(d / "config.json")
    if cfg:
        rs = cfg.get("rope_scaling") or {}
        return "3.1" if rs.get("rope_type", rs.get("type")) == "llama3" else "3.0"
    return "3.1"


def _special_ids(backend, d: Path, kind: str, llama3: str) -> tuple[int | None, int, int, bool]:
    """(bos, eos, pad, add_bos) from the folder's JSON files, then per-family defaults.

    Order for each: tokenizer_config.json's token string, then config.json's id, then
    generation_config.json's id (a list of EOS ids picks the first), then the family default.
    Pad: Llama 3.1 has <|finetune_right_pad_id|> (128004); Llama 3.0, SmolLM2 without a pad,
    and sentencepiece models without one pad with EOS (padding is masked, any id works).
    """
    tc = _read_json(d / "tokenizer_config.json")
    cfgs = [_read_json(d / "config.json"), _read_json(d / "generation_config.json")]

    def from_token(key):
        v = tc.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str) and v:
            i = backend.lookup(v)
            if i is None:
                raise TokenizerError(f"{d / 'tokenizer_config.json'}: {key} {v!r} is not in the vocabulary")
            return i
        return None

    def from_ids(key):
        for c in cfgs:
            v = c.get(key)
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, int) and v >= 0:
                return v
        return None

    if kind == "sentencepiece":
        sp = backend.sp
        defaults = {"bos": sp.bos_id() if sp.bos_id() >= 0 else None,
                    "eos": sp.eos_id() if sp.eos_id() >= 0 else None,
                    "pad": sp.pad_id() if sp.pad_id() >= 0 else None}
        template_bos = defaults["bos"]
    elif kind == "tiktoken":
        defaults = {"bos": backend.lookup("<|begin_of_text|>"), "eos": backend.lookup("<|end_of_text|>"),
                    "pad": None if llama3 == "3.0" else backend.lookup("<|finetune_right_pad_id|>")}
        template_bos = defaults["bos"]
    else:
        template_bos = backend.template_bos()
        defaults = {"bos": template_bos, "eos": None,
                    "pad": backend.lookup("<|finetune_right_pad_id|>")}

    bos = from_token("bos_token")
    bos = bos if bos is not None else from_ids("bos_token_id")
    bos = bos if bos is not None else defaults["bos"]
    eos = from_token("eos_token")
    eos = eos if eos is not None else from_ids("eos_token_id")
    eos = eos if eos is not None else defaults["eos"]
    if eos is None:
        raise TokenizerError(f"{d}: no EOS token found (tokenizer_config.json eos_token or "
                         f"config.json eos_token_id)")
    pad = from_token("pad_token")
    pad = pad if pad is not None else from_ids("pad_token_id")
    pad = pad if pad is not None else defaults["pad"]
    pad = pad if pad is not None else eos

    # Whether the family puts BOS in front: tokenizer_config's add_bos_token when given (the
    # Llama 2 style), else what the tokenizer.json template does (Llama 3 adds, SmolLM2 not).
    add_bos = tc.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = template_bos is not None
    return bos, eos, pad, add_bos
