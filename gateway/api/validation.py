"""Checks on the texts a request carries, shared by the guardrail and admin servicers.

A text must be within `max_text_chars`, have a non-whitespace character, and
keep something visible after tier-0 normalisation; a text that normalisation
refuses (it expands past the limits, or nothing is left of it) is the caller's
to fix. Each failure is INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import re2

from gateway.runtime.errors import InvalidArgument
from router.normalize import NormalizationLimits, TextRejected, normalize

__all__ = ["refused_as_invalid", "validated_text"]

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
# A character that normalisation never removes: anything but whitespace, control
# and format characters, non-spacing marks (variation selectors, the combining
# grapheme joiner), the Hangul fillers, the word-joiner block and the tag
# characters. A superset of what `router.normalize` deletes, so a text with one
# such character has something left after normalisation (a payload that decodes
# to nothing visible is the router's to refuse), and only a text made of nothing
# else (rare) is normalised here to find out.
_SURVIVES_NORMALIZATION = re2.compile(
    r"[^\s\p{Cc}\p{Cf}\p{Mn}\p{Z}\x{115F}\x{1160}\x{3164}\x{FFA0}"
    r"\x{2060}-\x{206F}\x{E0000}-\x{E007F}]",
    _RE2_OPTIONS,
)


def validated_text(field: str, text: str, *, max_chars: int) -> str:
    """`text` if it is within the length limit and has something visible to check.

    Raises:
        InvalidArgument: naming `field`, saying what to fix.
    """
    if len(text) > max_chars:
        raise InvalidArgument(
            field,
            f"is {len(text)} characters long; the limit is {max_chars}: send a shorter text "
            "or split it into parts",
        )
    if not text.strip():
        raise InvalidArgument(field, "must contain at least one non-whitespace character")
    if _SURVIVES_NORMALIZATION.search(text) is None:
        with refused_as_invalid(field):
            limits = NormalizationLimits.for_raw_limit(max_chars)  # as the router's
            empty = not normalize(text, limits=limits).text
        if empty:
            raise InvalidArgument(
                field,
                f"contains no visible characters after normalisation ({len(text):,} "
                "characters, all zero-width or other invisible characters, byte order "
                "marks, control characters or whitespace): send the text itself",
            )
    return text


@contextlib.contextmanager
def refused_as_invalid(field: str) -> Iterator[None]:
    """A text normalisation refuses (it expands too far, or nothing is left of it)
    is the caller's to fix: INVALID_ARGUMENT naming `field`, with the reason."""
    try:
        yield
    except TextRejected as exc:
        raise InvalidArgument(field, str(exc)) from exc
