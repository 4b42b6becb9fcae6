"""Windows of long texts: what the embedder would otherwise never read. Pure.

all-MiniLM-L6-v2 reads the first 256 word pieces of a text and drops the rest,
so an instruction buried after a long role-play preamble or inside a long
document never reaches tier 1. The router embeds overlapping windows of a
long text as well as the whole, scores each and keeps the riskiest.
"""

from __future__ import annotations

__all__ = ["WINDOW_STRIDE", "WINDOW_WORDS", "windows"]

# Words per window and step between window starts: a window of 128 words stays
# well inside 256 word pieces for English, and consecutive windows overlap by
# a quarter so an instruction is never cut in half by every window.
WINDOW_WORDS = 128
WINDOW_STRIDE = 96


def windows(
    text: str,
    *,
    size: int = WINDOW_WORDS,
    stride: int = WINDOW_STRIDE,
    min_words: int | None = None,
    max_windows: int = 16,
) -> list[str]:
    """Overlapping word windows of `text`, or [] when the whole text fits.

    Args:
        size: Words per window.
        stride: Words between window starts (<= size).
        min_words: Texts of at most this many words get no windows (default: size + size // 4).
        max_windows: At most this many windows, spread evenly and always
            including the first and the last (the cost of a huge text stays bounded).
    """
    if not 0 < stride <= size:
        raise ValueError("windows need 0 < stride <= size")
    words = text.split()
    limit = size + size // 4 if min_words is None else min_words
    if len(words) <= limit:
        return []
    starts = sorted({*range(0, len(words) - size, stride), len(words) - size})
    if len(starts) > max_windows:
        picks = [round(i * (len(starts) - 1) / (max_windows - 1)) for i in range(max_windows)]
        starts = [starts[i] for i in sorted(set(picks))]
    return [" ".join(words[s : s + size]) for s in starts]
