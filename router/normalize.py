"""Tier 0 normalisation: make an obfuscated prompt say plainly what it says.

Attackers hide instructions from filters with look-alike characters, invisible
characters, spaced-out letters and encodings (base64, hex, URL escapes, HTML
entities, Unicode tag characters). Everything after this module (regexes and
the embedder) sees the canonical text, with decoded payloads substituted where
they stood, so an attack is scored on its meaning rather than its disguise.

All of it is linear in the length of the input: no backtracking regexes run on
user text (the few patterns here are RE2).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import re2

__all__ = ["NormalizedText", "normalize", "normalized_text"]

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False

# Characters that render as nothing: zero-width, bidi controls, soft hyphen,
# word joiners, the BOM, variation selectors.
_INVISIBLE = {
    0x00AD,
    0x034F,
    0x061C,
    0x115F,
    0x1160,
    0x17B4,
    0x17B5,
    0x180E,
    0x3164,
    0xFEFF,
    0xFFA0,
    *range(0x200B, 0x2010),
    *range(0x202A, 0x202F),
    *range(0x2060, 0x2070),
    *range(0xFE00, 0xFE10),
}
_INVISIBLE_TABLE = dict.fromkeys(_INVISIBLE)

# Unicode "tag" characters (U+E0000..U+E007F) mirror ASCII invisibly and are
# used to smuggle instructions past human reviewers.
_TAG_BASE = 0xE0000

# Look-alikes of Latin letters from Cyrillic, Greek and Armenian, folded only
# inside words that mix them with Latin letters (so Russian or Greek text is
# left alone). A subset of Unicode's confusables.txt covering the letters seen
# in homoglyph attacks.
_CONFUSABLES = str.maketrans(
    {
        "а": "a", "в": "b", "с": "c", "е": "e", "һ": "h", "і": "i", "ј": "j",
        "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "ѕ": "s", "т": "t",
        "у": "y", "х": "x", "ү": "y", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g",
        "А": "A", "В": "B", "С": "C", "Е": "E", "Н": "H", "І": "I", "Ј": "J",
        "К": "K", "М": "M", "О": "O", "Р": "P", "Ѕ": "S", "Т": "T", "Х": "X",
        "Ү": "Y", "α": "a", "ε": "e", "ι": "i", "ο": "o", "ρ": "p",
        "τ": "t", "υ": "u", "ν": "v", "χ": "x", "κ": "k", "Α": "A", "Β": "B",
        "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
        "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "օ": "o", "ս": "u",
        "ց": "g", "հ": "h", "ո": "n", "ı": "i",
    }
)  # fmt: skip
_WORD = re2.compile(r"[\pL\pM\pN_]+", _RE2_OPTIONS)
_CONFUSABLE_CHARS = frozenset("авсеһіјкмнорѕтухүԁԛԝɡАВСЕНІЈКМОРЅТХҮαειορτυνχκΑΒΕΖΗΙΚΜΝΟΡΤΥΧօսցհոı")

# "i g n o r e  a l l" -> "ignore all": five or more single letters spaced out.
_SPACED_LETTERS = re2.compile(r"(?:\b\w[ .\-_*]){4,}\w\b", _RE2_OPTIONS)
_SPACE_RUNS = re2.compile(r"[ \t\f\v]+", _RE2_OPTIONS)

# Encoded payloads: long enough that ordinary words and ids do not qualify.
_BASE64 = re2.compile(r"[A-Za-z0-9+/_\-]{16,}={0,2}", _RE2_OPTIONS)
_HEX = re2.compile(r"(?:\\x|0x)?(?:[0-9A-Fa-f]{2}(?:[ :]|\\x|0x)?){8,}", _RE2_OPTIONS)
_PERCENT = re2.compile(r"(?:%[0-9A-Fa-f]{2}){4,}", _RE2_OPTIONS)
_ENTITIES = re2.compile(r"(?:&#[xX]?[0-9A-Fa-f]{1,6};){3,}", _RE2_OPTIONS)
_ROT13_HINT = re2.compile(r"(?i)\brot[\s\-]?13\b|\bcaesar\b", _RE2_OPTIONS)

_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
)
_LEET_WORD = re2.compile(r"[A-Za-z0-9@$]*[013457@$][A-Za-z0-9@$]*", _RE2_OPTIONS)

_MAX_DECODE_DEPTH = 2


@dataclass(frozen=True, slots=True)
class NormalizedText:
    """The canonical form of a text and how it was obtained.

    Attributes:
        original: The text as received.
        text: Canonical text with decoded payloads substituted in place; this is
            what the regexes and the embedder read.
        decoded: Payloads that were decoded (base64, hex, ...), for evidence.
        extra_views: Further (name, text) readings only the regexes see: the
            text with leetspeak folded ("1gn0r3" -> "ignore"), or decoded from
            ROT13 when the text mentions it.
        steps: Names of the normalisation steps that changed the text.
    """

    original: str
    text: str
    decoded: tuple[str, ...] = ()
    extra_views: tuple[tuple[str, str], ...] = ()
    steps: tuple[str, ...] = field(default=())

    def views(self) -> list[tuple[str, str]]:
        """The (name, text) views the prefilter matches against."""
        return [("normalized", self.text), *self.extra_views]


def normalize(text: str) -> NormalizedText:
    """Return the canonical form of `text`; see the module docstring."""
    steps: list[str] = []
    decoded: list[str] = []

    current = _step(steps, "tag_characters_decoded", text, _decode_tag_characters)
    current = _step(steps, "nfkc", current, lambda t: unicodedata.normalize("NFKC", t))
    current = _step(steps, "invisible_removed", current, lambda t: t.translate(_INVISIBLE_TABLE))
    current = _step(steps, "confusables_folded", current, _fold_confusables)
    current = _step(steps, "spaced_letters_joined", current, _join_spaced_letters)
    for _ in range(_MAX_DECODE_DEPTH):
        before = len(decoded)
        current = _step(steps, "html_entities_decoded", current, _decode_entities)
        current = _step(
            steps, "url_escapes_decoded", current, lambda t: _decode_percent(t, decoded)
        )
        current = _step(steps, "hex_decoded", current, lambda t: _decode_hex(t, decoded))
        current = _step(steps, "base64_decoded", current, lambda t: _decode_base64(t, decoded))
        if len(decoded) == before:
            break
    current = _SPACE_RUNS.sub(" ", current).strip()
    extra_views: list[tuple[str, str]] = []
    leet = _fold_leet(current)
    if leet is not None:
        extra_views.append(("leetspeak", leet))
        steps.append("leetspeak_view_added")
    if _ROT13_HINT.search(current):
        extra_views.append(("rot13", codecs.decode(current, "rot13")))
        steps.append("rot13_view_added")
    return NormalizedText(
        original=text,
        text=current,
        decoded=tuple(decoded),
        extra_views=tuple(extra_views),
        steps=tuple(dict.fromkeys(steps)),
    )


def normalized_text(text: str) -> str:
    """Just the canonical text: what the embedder reads for `text`."""
    return normalize(text).text


def _step(steps: list[str], name: str, text: str, transform: Callable[[str], str]) -> str:
    result = transform(text)
    if result != text:
        steps.append(name)
    return result


def _decode_tag_characters(text: str) -> str:
    if not any(_TAG_BASE <= ord(ch) <= _TAG_BASE + 0x7F for ch in text):
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if _TAG_BASE + 0x20 <= code <= _TAG_BASE + 0x7E:
            out.append(chr(code - _TAG_BASE))
        elif not _TAG_BASE <= code <= _TAG_BASE + 0x7F:
            out.append(ch)
    return "".join(out)


def _fold_confusables(text: str) -> str:
    if text.isascii():
        return text

    def fold(match: re2._Match) -> str:
        word = match.group(0)
        mixed = any(ch.isascii() and ch.isalpha() for ch in word) and any(
            ch in _CONFUSABLE_CHARS for ch in word
        )
        return word.translate(_CONFUSABLES) if mixed else word

    return _WORD.sub(fold, text)


def _join_spaced_letters(text: str) -> str:
    return _SPACED_LETTERS.sub(lambda m: "".join(m.group(0)[::2]), text)


def _decode_entities(text: str) -> str:
    return _ENTITIES.sub(lambda m: html.unescape(m.group(0)), text)


def _decode_percent(text: str, decoded: list[str]) -> str:
    def replace(match: re2._Match) -> str:
        plain = urllib.parse.unquote(match.group(0))
        return _keep_if_text(plain, match.group(0), decoded)

    return _PERCENT.sub(replace, text)


def _decode_hex(text: str, decoded: list[str]) -> str:
    def replace(match: re2._Match) -> str:
        digits = "".join(
            ch for ch in match.group(0).replace("0x", "").replace("\\x", "") if ch in _HEXDIGITS
        )
        try:
            plain = bytes.fromhex(digits).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return match.group(0)
        return _keep_if_text(plain, match.group(0), decoded)

    return _HEX.sub(replace, text)


_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


def _decode_base64(text: str, decoded: list[str]) -> str:
    def replace(match: re2._Match) -> str:
        token = match.group(0)
        if token.isalpha() or token.isdigit():
            return token  # a long word or number, not an encoding
        padded = token + "=" * (-len(token) % 4)
        try:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
            plain = raw.decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return token
        return _keep_if_text(plain, token, decoded)

    return _BASE64.sub(replace, text)


def _keep_if_text(plain: str, encoded: str, decoded: list[str]) -> str:
    """Substitute a decoding only when it reads as language, not as bytes."""
    if len(plain) < 4:
        return encoded
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in plain)
    letters = sum(ch.isalpha() or ch == " " for ch in plain)
    if printable < 0.95 * len(plain) or letters < 0.6 * len(plain):
        return encoded
    decoded.append(plain)
    return plain


def _fold_leet(text: str) -> str | None:
    changed = False

    def replace(match: re2._Match) -> str:
        nonlocal changed
        word = match.group(0)
        if word.isdigit() or sum(ch.isalpha() for ch in word) < 2:
            return word
        changed = True
        return word.translate(_LEET)

    folded = _LEET_WORD.sub(replace, text)
    return folded if changed else None
