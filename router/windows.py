"""Windows of long texts: what the embedder would otherwise never read. Pure.

all-MiniLM-L6-v2 reads the first 256 word pieces of a text and drops the rest,
so an instruction buried after a long role-play preamble or at the end of a
long document never reaches tier 1. The router also embeds a few windows of a
long text, scores each like a text of its own and keeps the riskiest.

Which windows: never the start (the whole text's own reading covers it), always
the end (where a pasted document is followed by the actual ask), and at most
`MAX_WINDOWS` in all, spread evenly. Measured leave-one-source-out
(`tierguard eval --cross-source`), every window of a long text bought 1.3
points of recall; the last window alone, or the last and one more, buy 1.0 of
them for a quarter to a half of the extra encodes (each window is one more
call to the model, so this bounds what a long prompt costs).
"""

from __future__ import annotations

__all__ = ["MAX_WINDOWS", "WINDOW_STRIDE", "WINDOW_WORDS", "windows"]

# Words per window and step between window starts: a window of 128 words stays
# well inside 256 word pieces for English, and consecutive windows overlap by
# a quarter so an instruction is never cut in half by every window.
WINDOW_WORDS = 128
WINDOW_STRIDE = 96
MAX_WINDOWS = 2


def windows(
    text: str,
    *,
    size: int = WINDOW_WORDS,
    stride: int = WINDOW_STRIDE,
    min_words: int | None = None,
    max_windows: int = MAX_WINDOWS,
) -> list[str]:
    """Overlapping word windows of `text` after its start, or [] when the whole text fits.

    Args:
        size: Words per window.
        stride: Words between window starts (<= size).
        min_words: Texts of at most this many words get no windows (default: size + size // 4).
        max_windows: At most this many windows, spread evenly and always
            including the last (the cost of a huge text stays bounded).
    """
    if not 0 < stride <= size:
        raise ValueError("windows need 0 < stride <= size")
    if max_windows < 1:
        raise ValueError("max_windows must be at least 1")
    words = text.split()
    limit = size + size // 4 if min_words is None else min_words
    if len(words) <= limit:
        return []
    last = len(words) - size
    starts = sorted({*range(stride, last, stride), last})
    if len(starts) > max_windows:
        if max_windows == 1:
            starts = [last]
        else:
            picks = {round(i * (len(starts) - 1) / (max_windows - 1)) for i in range(max_windows)}
            starts = [starts[i] for i in sorted(picks)]
    return [" ".join(words[s : s + size]) for s in starts]
