"""Sparse lexical vectors for Korean: character n-grams weighted like BM25.

Korean words carry particles and endings ("텀블러를", "텀블러로"), so whole words rarely match;
overlapping character bigrams do (the approach of Lucene's CJKBigramFilter). Each Hangul word adds
its bigrams and its first syllable, so one-syllable stems ("책", "옷", "물") still match whatever
particle follows. Latin words and numbers are kept whole.

Document values are BM25's saturated term frequency (Robertson & Zaragoza, "The Probabilistic
Relevance Framework: BM25 and Beyond", 2009, eq. 3.15 without the IDF factor); Qdrant multiplies
in the IDF from its own collection statistics (`Modifier.IDF`), so adding a document needs no
global recount. Query values are the term counts.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

K1 = 1.2  # BM25 term-frequency saturation (the reference above, section 3.4: 1.2 is the usual value)
B = 0.75  # BM25 length normalisation (same section)
AVERAGE_DOCUMENT_TERMS = 150.0  # about the mean term count of the seeded documents (title + text)
_WORD = re.compile(r"[0-9a-z]+|[\uac00-\ud7a3]+")  # a run of Latin letters/digits, or of Hangul syllables


@dataclass(frozen=True)
class SparseVector:
    """Qdrant's sparse vector: parallel lists of term indices (unsigned 32-bit) and weights."""

    indices: list[int]
    values: list[float]


def terms(text: str) -> list[str]:
    """The text's terms, in order: NFKC, lower-cased; per Hangul word its first syllable and its
    character bigrams; Latin words and numbers whole. Punctuation and other scripts are dropped."""
    out: list[str] = []
    for word in _WORD.findall(unicodedata.normalize("NFKC", text).lower()):
        if word.isascii():
            out.append(word)
            continue
        out.append(word[0])
        out.extend(word[i : i + 2] for i in range(len(word) - 1))
    return out


def term_index(term: str) -> int:
    """A stable 32-bit index for a term (BLAKE2b): the same in every process and release."""
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=4).digest(), "little")


def _vector(weights: dict[int, float]) -> SparseVector:
    indices = sorted(weights)
    return SparseVector(indices=indices, values=[weights[i] for i in indices])


def _counts(text: str) -> Counter[int]:
    return Counter(term_index(term) for term in terms(text))


def document_vector(text: str) -> SparseVector:
    """A document's vector: per term tf·(K1+1) / (tf + K1·(1 − B + B·length/AVERAGE_DOCUMENT_TERMS))."""
    counts = _counts(text)
    norm = K1 * (1 - B + B * sum(counts.values()) / AVERAGE_DOCUMENT_TERMS)
    return _vector({index: tf * (K1 + 1) / (tf + norm) for index, tf in counts.items()})


def query_vector(text: str) -> SparseVector:
    """A query's vector: each term's count. Empty when the text has no Hangul, Latin or digits."""
    return _vector({index: float(tf) for index, tf in _counts(text).items()})
