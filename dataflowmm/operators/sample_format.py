"""Data-Juicer's multimodal sample text: image placeholders and chunk ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simhash import Simhash

IMAGE_TOKEN = "<__dj__image>"
EOC_TOKEN = "<|__dj__eoc|>"


@dataclass(frozen=True)
class SpecialTokens:
    """The placeholder for an image and the end-of-chunk mark (configurable per dataset)."""

    image: str = IMAGE_TOKEN
    eoc: str = EOC_TOKEN

    def remove(self, text: str) -> str:
        """Text with every special token removed and whitespace collapsed."""
        return " ".join(text.replace(self.image, " ").replace(self.eoc, " ").split())

    def chunks(self, text: str) -> list[str]:
        """Non-empty chunks of `text` split at end-of-chunk marks (the last may lack one)."""
        return [chunk for chunk in text.split(self.eoc) if chunk.strip()]

    def has_tokens(self, text: str) -> bool:
        return self.image in text or self.eoc in text


def row_image_paths(value: Any, key: str) -> list[str]:
    """The image paths of a row: a list of strings, one string, or nothing (None / [])."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(path, str) for path in value):
        raise ValueError(f"key {key!r}: expected a list of image paths, got {value!r}")
    return value


def captioned_chunk(chunk: str, captions: list[str], tokens: SpecialTokens) -> str:
    """A chunk rewritten as its image tokens, each followed by its own caption, then `eoc`.

    The original words are dropped (the generated sample describes the images), the
    special tokens keep their order, and caption i goes right after image token i.
    """
    parts = []
    for index in range(chunk.count(tokens.image)):
        parts.append(f"{tokens.image} {captions[index]}")
    parts.append(tokens.eoc)
    return " ".join(parts)


def word_bigrams(text: str) -> list[str]:
    """Lower-cased, space-tokenised word bigrams (the shingles of Data-Juicer's SimHash)."""
    words = text.lower().split()
    return [f"{words[i]} {words[i + 1]}" for i in range(len(words) - 1)]


def simhash64(text: str) -> int:
    """64-bit SimHash of `text` over word-bigram shingles (0 for fewer than two words)."""
    return Simhash(word_bigrams(text), f=64).value


def most_similar_by_simhash(reference: str, candidates: list[str]) -> int:
    """Index of the candidate whose SimHash differs from the reference's in fewest bits.

    Ties go to the first such candidate.
    """
    reference_hash = simhash64(reference)
    distances = [bin(reference_hash ^ simhash64(candidate)).count("1") for candidate in candidates]
    return distances.index(min(distances))
