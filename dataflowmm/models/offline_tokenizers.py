"""Tokenizers made in memory, with no download, for the tiny and the full-size random models.

They are small (hundreds of tokens) but real: `tokenizers`-backed `CLIPTokenizer` (byte-level
BPE), `T5Tokenizer` (Unigram) and `LlamaTokenizer` (SentencePiece-style BPE with byte fallback)
with the same normalisers and pre-tokenisers as the hub tokenizers they stand in for, learned
in milliseconds from a few caption-like sentences. Given `vocab_size`, the vocabulary is padded
with unreachable filler tokens to the real model's size, at the real special-token ids, so a
full-size random model's embedding table and every id it generates have a token.

The vocabularies are learned here rather than with `tokenizers.trainers`: those trainers
break ties in hash-map order, so two trainings on the same text give different vocabularies,
and the tiny models must build identically every time. The text is still normalised and
split by the `tokenizers` components the real tokenizers use.
"""

from __future__ import annotations

import math
from collections import Counter

from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from transformers import CLIPTokenizer, LlamaTokenizer, T5Tokenizer

# A few sentences in the register of image captions and prompts.
CORPUS: tuple[str, ...] = (
    "a photo of a cat sitting on a red sofa",
    "a painting of a dog running in the park",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of fruit on a wooden table, studio lighting",
    "two people walking along the beach at sunset",
    "a small house in the mountains covered with snow",
    "a close-up photograph of a flower with water drops",
    "a city street at night with cars and bright lights",
    "a bird standing on a branch of a green tree",
    "an old man reading a book next to the window",
    "a plate of food with rice, vegetables and meat",
    "a blue car parked in front of a white building",
    "the image shows a child playing with a ball",
    "high quality, detailed, 4k, realistic, colorful",
)

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_WORD_END = "</w>"
# CLIPTokenizer's own pre-tokenisation (transformers 5).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_SPACE = "▁"
_PRINTABLE = [chr(code) for code in range(33, 127)]
_LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")


def filler_tokens(count: int) -> list[str]:
    """`count` distinct tokens no text produces: they only pad a vocabulary to its real size."""
    return [f"<|unused_{index}|>" for index in range(count)]


def _padded(tokens: list[str], vocab_size: int | None, reserved: int = 0) -> list[str]:
    """`tokens` (duplicates dropped) plus fillers, so that with `reserved` more tokens
    appended after them the vocabulary has `vocab_size` entries."""
    unique = list(dict.fromkeys(tokens))
    if vocab_size is None:
        return unique
    missing = vocab_size - reserved - len(unique)
    if missing < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(unique) + reserved} learned tokens")
    return unique + filler_tokens(missing)


def byte_alphabet() -> list[str]:
    """The 256 byte symbols of byte-level BPE, in byte order (GPT-2's bytes_to_unicode)."""
    visible = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in visible:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def _clip_words(corpus: tuple[str, ...]) -> Counter:
    """Word counts after CLIP's normaliser and byte-level pre-tokeniser."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter = Counter()
    for text in corpus:
        words.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    return words


def _merge_word(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def learn_bpe_merges(words: Counter, num_merges: int, word_end: str = _WORD_END) -> list[tuple[str, str]]:
    """Classic BPE merge learning; ties go to the alphabetically first pair (deterministic).

    `word_end` marks each word's last symbol (CLIP's "</w>"; "" for SentencePiece-style BPE,
    whose words carry a leading "▁" instead)."""
    segmented = {tuple(word[:-1]) + (word[-1] + word_end,): count for word, count in words.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for symbols, count in segmented.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        segmented = {_merge_word(symbols, best): count for symbols, count in segmented.items()}
    return merges


def make_clip_tokenizer(
    model_max_length: int = 77,
    num_merges: int = 200,
    corpus: tuple[str, ...] = CORPUS,
    vocab_size: int | None = None,
    pad_token: str = _EOS,
) -> CLIPTokenizer:
    """A `CLIPTokenizer` (byte-level BPE, "</w>" word ends) learned from `corpus`.

    The vocabulary is laid out like CLIP's: the 256 bytes, the 256 bytes + "</w>", one token
    per merge, then <|startoftext|> and <|endoftext|> (also the pad token by default, as in
    Stable Diffusion; SDXL's second tokenizer pads with "!"). No text is ever unknown. With
    `vocab_size` (CLIP's is 49408) fillers come before the two specials, which then sit at
    CLIP's ids (49406, 49407).
    """
    merges = learn_bpe_merges(_clip_words(corpus), num_merges)
    alphabet = byte_alphabet()
    tokens = alphabet + [symbol + _WORD_END for symbol in alphabet]
    tokens = _padded(tokens + [left + right for left, right in merges], vocab_size, reserved=2)
    vocab = {token: index for index, token in enumerate(tokens + [_BOS, _EOS])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                         pad_token=pad_token)


def _t5_pieces(corpus: tuple[str, ...], max_piece_length: int = 8) -> list[tuple[str, float]]:
    """Unigram pieces: every substring seen at least twice and every whole word, scored by
    log relative frequency, plus every printable ASCII character and "▁" as a fallback."""
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True),
        ]
    )
    words = Counter(word for text in corpus for word, _ in splitter.pre_tokenize_str(text))
    counts: Counter = Counter()
    for word, count in words.items():
        for start in range(len(word)):
            for end in range(start + 2, min(len(word), start + max_piece_length) + 1):
                counts[word[start:end]] += count
        if len(word) > max_piece_length:
            counts[word] += count
    kept = {piece for piece, count in counts.items() if count >= 2} | set(words)
    total = sum(counts[piece] for piece in kept)
    scored = sorted(
        ((piece, math.log(counts[piece] / total)) for piece in kept), key=lambda x: (-x[1], x[0])
    )
    floor = min(score for _, score in scored) - 1.0
    singles = [(char, floor) for char in [_SPACE, *_PRINTABLE]]
    return scored + singles


def make_t5_tokenizer(
    model_max_length: int = 512,
    corpus: tuple[str, ...] = CORPUS,
    vocab_size: int | None = None,
    extra_ids: int = 0,
) -> T5Tokenizer:
    """A `T5Tokenizer` (Unigram, "▁" word starts) learned from `corpus`; no sentencepiece file.

    Ids follow T5: <pad> 0, </s> 1, <unk> 2. Characters outside printable ASCII are <unk>.
    By default there are no <extra_id_N> sentinels (a text-to-image encoder never uses them);
    T5 v1.1's layout is `vocab_size=32000, extra_ids=100` (32100 tokens).
    """
    pieces = [(special, 0.0) for special in _T5_SPECIALS] + _t5_pieces(corpus)
    if vocab_size is not None:
        floor = min(score for _, score in pieces) - 1.0
        names = _padded([piece for piece, _ in pieces], vocab_size)
        pieces += [(filler, floor) for filler in names[len(pieces):]]
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=model_max_length)


def make_llama_tokenizer(
    vocab_size: int | None = None,
    added_tokens: tuple[str, ...] = (),
    pad_token: str | None = None,
    num_merges: int = 200,
    corpus: tuple[str, ...] = CORPUS,
) -> LlamaTokenizer:
    """A `LlamaTokenizer` (BPE over "▁"-prefixed words, byte fallback) learned from `corpus`.

    Ids follow LLaMA's: <unk> 0, <s> 1, </s> 2, the 256 byte tokens <0x00>..<0xFF>, then the
    pieces (with `vocab_size`, fillers up to it: LLaMA's is 32000). `added_tokens` (e.g.
    LLaVA's "<image>", "<pad>") follow as special tokens, in order; `pad_token` names one.
    """
    words = Counter(_SPACE + word for text in corpus for word in text.split())
    merges = learn_bpe_merges(words, num_merges, word_end="")
    tokens = list(_LLAMA_SPECIALS) + [f"<0x{byte:02X}>" for byte in range(256)]
    tokens += [_SPACE, *_PRINTABLE] + [left + right for left, right in merges]
    vocab = {token: index for index, token in enumerate(_padded(tokens, vocab_size))}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # as LLaMA: "<s>" first
    if added_tokens:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in added_tokens],
                             special_tokens=True)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer
