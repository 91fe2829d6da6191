"""Streaming detokenization: the text of a completion, one token at a time, in linear time.

mlx-lm picks a `StreamingDetokenizer` per tokenizer (`tokenizer.detokenizer`). Its byte-level
BPE one (GPT-2 style, what our tiny models and SmolLM2 use) differs from `tokenizer.decode`
in two ways that matter here: it drops the leading space of a completion (right for SPM
tokenizers, wrong for byte-level BPE: "Once upon a time" + " there" would lose the space),
and it reads byte 0 as "Ā". `ByteLevelDetokenizer` keeps mlx-lm's interface (`reset`,
`add_token`, `last_segment`, `finalize`, `text`) and equals `tokenizer.decode(tokens)`:
each token's bytes go through one incremental UTF-8 decoder, so a character split across
tokens appears once it is complete, never as U+FFFD halves. Other tokenizers keep mlx-lm's.
"""

from __future__ import annotations

import codecs
import functools

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, StreamingDetokenizer


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


class ByteLevelDetokenizer(StreamingDetokenizer):
    """Exact streaming detokenizer for byte-level BPE tokenizers (see the module docstring)."""

    def __init__(self, tokenizer):
        to_byte = _unicode_to_byte()
        added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._bytes: list[bytes] = []
        for i, piece in enumerate(pieces):
            piece = piece or ""
            if i in added or any(c not in to_byte for c in piece):
                self._bytes.append(piece.encode("utf-8"))  # added tokens are text as written
            else:
                self._bytes.append(bytes(to_byte[c] for c in piece))
        self.reset()

    def reset(self):
        self.offset = 0
        self.text = ""
        self.tokens = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_token(self, token):
        self.tokens.append(token)
        data = self._bytes[token] if 0 <= token < len(self._bytes) else b""  # ids past the tokenizer: no text
        self.text += self._utf8.decode(data)

    def finalize(self):
        self.text += self._utf8.decode(b"", final=True)  # an unfinished character: U+FFFD, as decode gives


def streaming_detokenizer(tokenizer) -> StreamingDetokenizer:
    """A prototype detokenizer for `tokenizer` (an mlx-lm TokenizerWrapper); copy it per use
    (`copy.copy` then `reset()`), as mlx-lm does, since building one reads the whole vocabulary."""
    theirs = tokenizer.detokenizer
    if isinstance(theirs, BPEStreamingDetokenizer):
        return ByteLevelDetokenizer(tokenizer)
    return theirs
