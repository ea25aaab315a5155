"""CLIP's BPE tokenizer (open_clip's ``SimpleTokenizer``) with the standard library and numpy only.

Same vocabulary file (``bpe_simple_vocab_16e6.txt.gz``, shipped by ``distillery export`` with
``export.text_encoder: true``), same byte-to-unicode table, merges, ``<start_of_text>`` / ``<end_of_text>``,
lower-casing, whitespace cleaning, context length 77 and truncation (the last kept token becomes
``<end_of_text>``). Output: int64 (B, 77), zero-padded, as open_clip's ``tokenizer(texts)``.

Differences from open_clip, which uses the third-party ``regex`` and ``ftfy`` packages:

- ``\\p{L}`` / ``\\p{N}`` become explicit character classes built from this Python's ``unicodedata``
  (categories L* and N*); ``regex`` ships its own Unicode tables, so a character whose category changed
  between the two Unicode versions can split differently.
- ``ftfy.fix_text`` is approximated by what it does to text that is not mojibake: NFC normalisation,
  straight quotes for curly ones, compatibility forms for ligatures, digraphs and full-width characters,
  removal of control characters, one kind of line break. Its repair of mis-decoded text (``"cafÃ©"`` ->
  ``"café"``) is not done, and C1 control characters (U+0080-U+009F), which ftfy reads as Windows-1252, are
  dropped: such input tokenises differently.

``tests/test_embedding_student.py`` checks token-for-token equality with open_clip on unicode and punctuation.
"""
from __future__ import annotations

import gzip
import html
import os
import re
import sys
import unicodedata
from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = ["SimpleTokenizer", "bytes_to_unicode", "CONTEXT_LENGTH", "VOCAB_FILE"]

CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<start_of_text>", "<end_of_text>"


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """utf-8 byte -> a printable unicode character (CLIP's reversible table, avoiding whitespace/control)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache()
def _category_classes() -> tuple[str, str]:
    """Regex character classes (escaped ranges) of every letter (L*) and every number (N*) code point."""
    letters: list[tuple[int, int]] = []
    numbers: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        cat = unicodedata.category(chr(cp))[0]
        target = letters if cat == "L" else numbers if cat == "N" else None
        if target is None:
            continue
        if target and target[-1][1] == cp - 1:
            target[-1] = (target[-1][0], cp)
        else:
            target.append((cp, cp))

    def cls(ranges):
        return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)

    return cls(letters), cls(numbers)


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"'})


def _compat(ch: str) -> str:
    """ftfy's fix_latin_ligatures / fix_character_width: NFKC of ligatures and full/half-width forms only."""
    cp = ord(ch)
    if (0xFB00 <= cp <= 0xFB06 or 0xFF01 <= cp <= 0xFFEE or cp == 0x3000 or 0x01C4 <= cp <= 0x01CC
            or 0x01F1 <= cp <= 0x01F3 or cp in (0x0132, 0x0133, 0x013F, 0x0140, 0x0149)):
        return unicodedata.normalize("NFKC", ch)
    return ch


def fix_text(text: str) -> str:
    """The part of ``ftfy.fix_text`` that applies to correctly decoded text (see the module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    text = "".join(_compat(c) for c in text).translate(_QUOTES)
    text = "".join(c for c in text if c in "\t\n" or not (unicodedata.category(c) == "Cc" or 0xFFF9 <= ord(c) <= 0xFFFB
                                                         or 0x206A <= ord(c) <= 0x206F or c == "\ufeff"))
    return unicodedata.normalize("NFC", text)


class SimpleTokenizer:
    """``tok(["a photo of a cat."])`` -> int64 (1, 77), as ``open_clip.get_tokenizer(...)`` for CLIP's BPE."""

    def __init__(self, bpe_path: str | os.PathLike, context_length: int = CONTEXT_LENGTH):
        self.byte_encoder = bytes_to_unicode()
        with gzip.open(os.fspath(bpe_path)) as f:
            merges = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        self.context_length = context_length
        self.vocab_size = len(self.encoder)
        letters, numbers = _category_classes()
        self.pat = re.compile(f"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^\\s{letters}{numbers}]+",
                              re.IGNORECASE)

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = set(zip(word, word[1:]))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = set(zip(word, word[1:]))
        out = " ".join(word)
        self.cache[token] = out
        return out

    @staticmethod
    def clean(text: str) -> str:
        """open_clip's default clean ('lower'): fix text, unescape HTML twice, collapse whitespace, lower-case."""
        text = html.unescape(html.unescape(fix_text(text))).strip()
        return " ".join(text.split()).strip().lower()

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for token in self.pat.findall(self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = np.zeros((len(texts), n), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot_token_id
            out[i, :len(ids)] = ids
        return out
