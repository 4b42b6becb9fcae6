"""Tier 0 normalisation: make an obfuscated prompt say plainly what it says.

Attackers hide instructions from filters with look-alike characters, invisible
characters, spaced-out letters and encodings (base64, hex, URL escapes, HTML
entities, Unicode tag characters). Everything after this module (regexes and
the embedder) sees the canonical text, with decoded payloads substituted where
they stood, so an attack is scored on its meaning rather than its disguise.

Bounded work. Normalisation runs on every request, so a hostile text must not
be able to make it expensive. `normalize` takes a `NormalizationLimits` and
raises `TextTooExpanded` (a `ValueError`; the message says what to fix) rather
than work past them. With the defaults (`DEFAULT_LIMITS`, sized for the
gateway's default `server.max_text_chars` of 20,000; `for_raw_limit` scales
them to another):

- the text may be at most `max_chars` = 80,000 characters long after every
  step. Only NFKC can lengthen a text (U+FDFA becomes 18 characters, which is
  the most any character grows); it is measured chunk by chunk, so a text that
  would expand past the limit is refused after about `max_chars` characters of
  output, not after expanding all of it. The other steps keep or shorten the
  text; the leetspeak and ROT13 views are as long as the text.
- decoding (HTML entities, URL escapes, hex, base64) follows each payload as
  deep as it goes, at most `max_decode_layers` = 32 layers (every layer of
  base64 grows a payload by a third, so 32 layers do not fit in 80,000
  characters anyway); the whole text is decoded again while a pass still
  changes it (a decoding may complete an encoding around it), at most
  `max_decode_rounds` = 4 passes; and the decoders read at most
  `max_decode_chars` = 640,000 characters in all (8 x `max_chars`; a text of
  80,000 characters nested as deep as it can be takes about 320,000).
- runs of combining marks are cut to 30 (the Stream-Safe Text Format of
  UAX #15): NFKC reorders a run in time quadratic in its length, and no
  written language needs more.

Every step is linear in the length of its input. Whether a pattern occurs at
all is asked of RE2 (one linear scan in C; for most texts the answer is no).
Substitutions, which can happen once per word, are made with Python `re`
(google-re2's Python wrapper costs several microseconds per match, `re` a
fraction of one), each pattern written so that it cannot backtrack: a
character class repeated with nothing after it, bounded repetitions, or a
repetition of fixed-width items. On the 2-core development machine the worst
of `benchmarks/expanding_text.py` at 20,000 characters takes under 10 ms of
CPU (it took 1.1 s before these bounds).

A text made only of what normalisation removes (zero-width characters, byte
order marks, control characters, whitespace) normalises to "": the caller
decides what that means (the router refuses it with
`EmptyAfterNormalization`).
"""

from __future__ import annotations

import binascii
import codecs
import html
import itertools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

import re2

__all__ = [
    "DEFAULT_LIMITS",
    "EmptyAfterNormalization",
    "NormalizationLimits",
    "NormalizedText",
    "TextRejected",
    "TextTooExpanded",
    "normalize",
    "normalized_text",
]

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False

# NFKC(text) is never longer than NFKD(text), the characters' decompositions
# one after the other. Every character decomposes to at most 3 but these 142
# (Unicode 14), which make 4 to 18 (U+FDFA ARABIC LIGATURE SALLALLAHOU ALAYHE
# WASALLAM; U+FDFB is next with 8): a text of n characters, k of them from this
# list, is at most 3n + 15k long after NFKC. The list only decides whether NFKC
# is measured chunk by chunk (a character missing from it, added by a later
# Unicode, still meets the length check after NFKC).
_MAX_NFKC_GROWTH = 18
_USUAL_NFKC_GROWTH = 3
_BIG_EXPANDER_RANGES = (
    (0x1F82, 0x1F87), (0x1F8A, 0x1F8F), (0x1F92, 0x1F97), (0x1F9A, 0x1F9F), (0x1FA2, 0x1FA7),
    (0x1FAA, 0x1FAF), (0x2057, 0x2057), (0x2152, 0x2152), (0x2167, 0x2167), (0x2177, 0x2177),
    (0x247D, 0x2487), (0x2A0C, 0x2A0C), (0x320E, 0x321E), (0x327C, 0x327D), (0x3300, 0x3302),
    (0x3304, 0x3304), (0x3307, 0x3308), (0x330C, 0x3313), (0x3315, 0x331B), (0x331E, 0x3321),
    (0x3324, 0x3324), (0x332B, 0x332F), (0x3332, 0x3334), (0x3336, 0x3336), (0x3338, 0x3338),
    (0x333A, 0x333E), (0x3340, 0x3340), (0x3343, 0x3343), (0x3347, 0x3348), (0x334A, 0x334A),
    (0x334C, 0x334E), (0x3351, 0x3351), (0x3353, 0x3354), (0x3356, 0x3356), (0x337F, 0x337F),
    (0x3389, 0x3389), (0x33A8, 0x33A8), (0x33AE, 0x33AF), (0x33C2, 0x33C2), (0x33C6, 0x33C6),
    (0x33D8, 0x33D8), (0xFDF2, 0xFDF8), (0xFDFA, 0xFDFC),
)  # fmt: skip
_BIG_EXPANDER = re.compile(
    "[" + "".join(f"{chr(first)}-{chr(last)}" for first, last in _BIG_EXPANDER_RANGES) + "]"
)  # one class: findall is a linear scan in C
_NFKC_CHUNK = 1024
# Composition across a chunk boundary can change the length by at most the
# combining marks there (a run is at most _MAX_MARK_RUN long).
_NFKC_BOUNDARY_SLACK = 32


@dataclass(frozen=True, slots=True)
class NormalizationLimits:
    """How much work normalising one text may take; see the module docstring.

    Attributes:
        max_chars: Longest text, in characters, before and after every step.
        max_decode_rounds: Passes of the decoders over the whole text; the
            text must stop changing within them.
        max_decode_layers: Layers of encoding followed inside one payload.
        max_decode_chars: Characters the decoders may read in all.
    """

    max_chars: int = 80_000
    max_decode_rounds: int = 4
    max_decode_layers: int = 32
    max_decode_chars: int = 640_000

    def __post_init__(self) -> None:
        for name in ("max_chars", "max_decode_rounds", "max_decode_layers", "max_decode_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NormalizationLimits.{name} must be a positive integer")

    @classmethod
    def for_raw_limit(cls, max_text_chars: int) -> NormalizationLimits:
        """Limits for texts of at most `max_text_chars` as received: 4x as long
        after normalisation, and 8x that read by the decoders."""
        if max_text_chars < 1:
            raise ValueError("max_text_chars must be a positive integer")
        return cls(max_chars=4 * max_text_chars, max_decode_chars=32 * max_text_chars)


DEFAULT_LIMITS = NormalizationLimits()


class TextRejected(ValueError):
    """The text cannot be checked as sent; the message says what to fix."""


class TextTooExpanded(TextRejected):
    """Normalising the text would take more work than `NormalizationLimits` allow.

    Attributes:
        step: The step that went past a limit: "input" (the text as received),
            "nfkc", or "decoding"; a step name from `NormalizedText.steps`
            otherwise.
        length: How far it got, in `unit`s (a lower bound when the step was
            stopped early); always above `limit`.
        limit: The limit it went past, in `unit`s.
        unit: "characters", or "layers" / "rounds" for decoding.
    """

    def __init__(
        self, step: str, length: int, limit: int, message: str, *, unit: str = "characters"
    ) -> None:
        super().__init__(message)
        self.step = step
        self.length = length
        self.limit = limit
        self.unit = unit


class EmptyAfterNormalization(TextRejected):
    """Nothing is left of the text once invisible and control characters are removed."""

    def __init__(self, length: int) -> None:
        super().__init__(
            f"the text ({length:,} characters) is empty after normalisation: it holds only "
            "zero-width or other invisible characters, byte order marks, control characters "
            "or whitespace; send the text itself"
        )
        self.length = length


# Characters that render as nothing: zero-width, bidi controls, soft hyphen,
# word joiners, the BOM, variation selectors, interlinear annotation marks.
# Control characters go too, except the whitespace ones (tab, line feed,
# vertical tab, form feed, carriage return, next line).
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
    *range(0xFFF9, 0xFFFC),
    *range(0x1BCA0, 0x1BCA4),
    *range(0x1D173, 0x1D17B),
    *range(0xE0100, 0xE01F0),
    *range(0x00, 0x09),
    *range(0x0E, 0x20),
    *range(0x7F, 0x85),
    *range(0x86, 0xA0),
}
_INVISIBLE_TABLE = dict.fromkeys(_INVISIBLE)
_HAS_INVISIBLE = re2.compile(
    "[" + "".join(f"\\x{{{code:X}}}" for code in sorted(_INVISIBLE)) + "]", _RE2_OPTIONS
)

# Unicode "tag" characters (U+E0000..U+E007F) mirror ASCII invisibly and are
# used to smuggle instructions past human reviewers.
_TAG_BASE = 0xE0000
_TAG_TABLE = {
    code: (chr(code - _TAG_BASE) if 0x20 <= code - _TAG_BASE <= 0x7E else None)
    for code in range(_TAG_BASE, _TAG_BASE + 0x80)
}
_HAS_TAG = re2.compile(r"[\x{E0000}-\x{E007F}]", _RE2_OPTIONS)

# Runs of combining marks (and the two halfwidth kana marks that decompose to
# them) longer than this are cut before NFKC.
_MAX_MARK_RUN = 30
_MARK_RUN_GATE = re2.compile(
    rf"[\pM\x{{FF9E}}\x{{FF9F}}]{{{_MAX_MARK_RUN + 1}}}", _RE2_OPTIONS
)  # every character with a combining class is a mark (\pM)
_KANA_MARKS = str.maketrans({"\uff9e": "\u3099", "\uff9f": "\u309a"})
# Over one byte per character, its combining class: a run of nonzero bytes,
# found from its start (a class repeated, nothing after it).
_LONG_CLASS_RUN = re.compile(rb"(?<![^\x00])[^\x00]{%d,}" % (_MAX_MARK_RUN + 1))

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
_CONFUSABLE_CHARS = frozenset("авсеһіјкмнорѕтухүԁԛԝɡАВСЕНІЈКМОРЅТХҮαειορτυνχκΑΒΕΖΗΙΚΜΝΟΡΤΥΧօսցհոı")
_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CONFUSABLE_CLASS = "[" + "".join(sorted(_CONFUSABLE_CHARS)) + "]"
_MIXED_WORD_GATE = re2.compile(
    rf"[A-Za-z][\pL\pM\pN_]*{_CONFUSABLE_CLASS}|{_CONFUSABLE_CLASS}[\pL\pM\pN_]*[A-Za-z]",
    _RE2_OPTIONS,
)
_WORD = re.compile(r"\w+")  # a class repeated, nothing after it

# "i g n o r e  a l l" -> "ignore all": five or more single letters spaced out.
# Each repetition is a fixed-width item and nothing follows the repetition.
_SPACED_LETTERS = re.compile(r"(?<!\w)\w(?:[ .\-*]\w(?!\w)){4,}", re.ASCII)
_SPACED_LETTERS_GATE = re2.compile(r"(?:\b\w[ .\-_*]){4,}\w\b", _RE2_OPTIONS)

# Encoded payloads: long enough that ordinary words and ids do not qualify.
# Bounded or fixed-width repetitions only (see the module docstring).
_B64_CHARS = "A-Za-z0-9+/_\\-"
# Each has an RE2 gate that matches wherever it does (most texts have none:
# one linear scan, and the Python pattern never runs).
_BASE64 = re.compile(rf"(?<![{_B64_CHARS}])[{_B64_CHARS}]{{16,}}={{0,2}}")
_BASE64_GATE = re2.compile(rf"[{_B64_CHARS}]{{16}}", _RE2_OPTIONS)
_HEX_PATTERN = r"(?:\\x|0x)?(?:[0-9A-Fa-f]{2}(?:[ :]|\\x|0x)?){8,}"
_HEX = re.compile(_HEX_PATTERN)
_HEX_GATE = re2.compile(_HEX_PATTERN, _RE2_OPTIONS)
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}(?:%[0-9A-Fa-f]{2}){3,}")
_PERCENT_GATE = re2.compile(r"(?:%[0-9A-Fa-f]{2}){4}", _RE2_OPTIONS)
_ENTITY = r"&#[xX]?[0-9A-Fa-f]{1,6};"
_ENTITIES = re.compile(rf"{_ENTITY}(?:{_ENTITY}){{2,}}")
_ENTITIES_GATE = re2.compile(rf"(?:{_ENTITY}){{3}}", _RE2_OPTIONS)
_ROT13_HINT = re2.compile(r"(?i)\brot[\s\-]?13\b|\bcaesar\b", _RE2_OPTIONS)

_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
)
_LEET_CHARS = frozenset("013457@$")
_LEET_TOKEN = re.compile(r"[A-Za-z0-9@$]+")  # a class repeated, nothing after it
# A token with a letter and a leetspeak symbol in it.
_LEET_GATE = re2.compile(
    r"[A-Za-z][A-Za-z0-9@$]*[013457@$]|[013457@$][A-Za-z0-9@$]*[A-Za-z]", _RE2_OPTIONS
)

_HORIZONTAL_SPACE = ("\t", "\f", "\v")
# Below this many characters a Python pattern scans faster than RE2 is called.
_GATE_ABOVE = 256


@dataclass(frozen=True, slots=True)
class NormalizedText:
    """The canonical form of a text and how it was obtained.

    Attributes:
        original: The text as received.
        text: Canonical text with decoded payloads substituted in place; this is
            what the regexes and the embedder read. "" when nothing visible is
            left (only zero-width characters, BOMs, control characters, spaces).
        decoded: Payloads that were decoded (base64, hex, ...), for evidence,
            each once, fully decoded.
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


def normalize(text: str, *, limits: NormalizationLimits = DEFAULT_LIMITS) -> NormalizedText:
    """Return the canonical form of `text`; see the module docstring.

    Raises:
        TextTooExpanded: the text, or a step's output, is longer than
            `limits.max_chars`, or its encodings go past the decoding limits.
    """
    if len(text) > limits.max_chars:
        raise TextTooExpanded(
            "input",
            len(text),
            limits.max_chars,
            f"the text is {len(text):,} characters long, above the normalisation limit of "
            f"{limits.max_chars:,} (step 'input'): send a shorter text or split it into parts",
        )
    steps: dict[str, None] = {}
    decoded: dict[str, None] = {}

    def step(name: str, current: str, transform: Callable[[str], str]) -> str:
        result = transform(current)
        if result != current:
            steps[name] = None
            _check_length(name, result, limits)
        return result

    current = step("tag_characters_decoded", text, _decode_tag_characters)
    current = step("combining_marks_capped", current, _cap_mark_runs)
    current = step("nfkc", current, lambda t: _nfkc(t, limits))
    current = step("invisible_removed", current, _remove_invisible)
    current = step("confusables_folded", current, _fold_confusables)
    current = step("spaced_letters_joined", current, _join_spaced_letters)
    before_decoding = current
    current = _Decoder(limits, steps, decoded).run(current)
    if current != before_decoding:  # a payload may decode to invisible characters
        current = step("invisible_removed", current, _remove_invisible)
    current = _collapse_spaces(current)
    extra_views: list[tuple[str, str]] = []
    leet = _fold_leet(current)
    if leet is not None:
        extra_views.append(("leetspeak", leet))
        steps["leetspeak_view_added"] = None
    if _ROT13_HINT.search(current):
        extra_views.append(("rot13", codecs.decode(current, "rot13")))
        steps["rot13_view_added"] = None
    for name, view in extra_views:
        _check_length(f"{name}_view_added", view, limits)
    return NormalizedText(
        original=text,
        text=current,
        decoded=tuple(decoded),
        extra_views=tuple(extra_views),
        steps=tuple(steps),
    )


def normalized_text(text: str, *, limits: NormalizationLimits = DEFAULT_LIMITS) -> str:
    """Just the canonical text: what the embedder reads for `text`."""
    return normalize(text, limits=limits).text


def _sub(
    gate: re2._Regexp, pattern: re.Pattern[str], repl: Callable[[re.Match[str]], str], text: str
) -> str:
    """`pattern.sub(repl, text)`, skipped for a long text the RE2 `gate` (which
    matches wherever `pattern` does) finds nothing in: one linear scan in C."""
    if len(text) > _GATE_ABOVE and gate.search(text) is None:
        return text
    return pattern.sub(repl, text)


def _check_length(step: str, text: str, limits: NormalizationLimits) -> None:
    if len(text) > limits.max_chars:
        raise TextTooExpanded(
            step,
            len(text),
            limits.max_chars,
            f"the text grows to {len(text):,} characters at normalisation step {step!r}, "
            f"above the limit of {limits.max_chars:,}: send a shorter text",
        )


def _decode_tag_characters(text: str) -> str:
    if text.isascii() or not _HAS_TAG.search(text):
        return text
    return text.translate(_TAG_TABLE)


def _cap_mark_runs(text: str) -> str:
    """Keep the first 30 of each run of combining characters (UAX #15 stream-safe)."""
    if text.isascii() or not _MARK_RUN_GATE.search(text):
        return text
    kana = "\uff9e" in text or "\uff9f" in text  # they decompose to combining marks
    classes = bytes(map(unicodedata.combining, text.translate(_KANA_MARKS) if kana else text))
    pieces = []
    end = 0
    for run in _LONG_CLASS_RUN.finditer(classes):
        pieces.append(text[end : run.start() + _MAX_MARK_RUN])
        end = run.end()
    if not pieces:
        return text
    pieces.append(text[end:])
    return "".join(pieces)


def _nfkc(text: str, limits: NormalizationLimits) -> str:
    """NFKC, refused (early) when the result would be longer than `limits.max_chars`."""
    if text.isascii() or unicodedata.is_normalized("NFKC", text):
        return text
    limit = limits.max_chars
    bound = _USUAL_NFKC_GROWTH * len(text)
    if bound <= limit and _BIG_EXPANDER.search(text):
        extra = _MAX_NFKC_GROWTH - _USUAL_NFKC_GROWTH
        enough = (limit - bound) // extra + 1  # this many put the bound over the limit
        bound += extra * sum(1 for _ in itertools.islice(_BIG_EXPANDER.finditer(text), enough))
    if bound > limit:
        # It could outgrow the limit: measure chunk by chunk and stop as soon as
        # it has (chunks normalise a little differently at their edges only).
        total = 0
        for count, start in enumerate(range(0, len(text), _NFKC_CHUNK)):
            chunk = text[start : start + _NFKC_CHUNK]
            total += len(unicodedata.normalize("NFKC", chunk))
            if total > limit + count * _NFKC_BOUNDARY_SLACK:
                raise _nfkc_too_long(total, len(text), limit, chunk, early=True)
    result = unicodedata.normalize("NFKC", text)
    if len(result) > limit:
        raise _nfkc_too_long(len(result), len(text), limit, text[:_NFKC_CHUNK], early=False)
    return result


def _nfkc_too_long(
    length: int, raw: int, limit: int, sample: str, *, early: bool
) -> TextTooExpanded:
    growing = sorted(
        (ch for ch in set(sample) if len(unicodedata.normalize("NFKC", ch)) > 2),
        key=lambda ch: (-len(unicodedata.normalize("NFKC", ch)), ch),
    )[:3]
    examples = ", ".join(f"U+{ord(ch):04X}" for ch in growing) or "ligatures"
    return TextTooExpanded(
        "nfkc",
        length,
        limit,
        f"the text ({raw:,} characters) expands to {'at least ' if early else ''}{length:,} "
        f"characters under Unicode NFKC normalisation (step 'nfkc'), above the limit of "
        f"{limit:,}: send it without compatibility characters such as {examples}, or send a "
        "shorter text",
    )


def _remove_invisible(text: str) -> str:
    if not _HAS_INVISIBLE.search(text):
        return text
    return text.translate(_INVISIBLE_TABLE)


def _fold_confusables(text: str) -> str:
    if text.isascii() or not _MIXED_WORD_GATE.search(text):
        return text

    def fold(match: re.Match[str]) -> str:
        word = match.group(0)
        if word.isascii() or _CONFUSABLE_CHARS.isdisjoint(word) or _ASCII_LETTERS.isdisjoint(word):
            return word
        return word.translate(_CONFUSABLES)

    return _WORD.sub(fold, text)


def _join_spaced_letters(text: str) -> str:
    return _sub(_SPACED_LETTERS_GATE, _SPACED_LETTERS, lambda m: m[0][::2], text)


def _collapse_spaces(text: str) -> str:
    """Runs of spaces and tabs become one space; the ends are stripped."""
    for ch in _HORIZONTAL_SPACE:
        if ch in text:
            text = text.replace(ch, " ")
    if "  " in text:
        text = " ".join(filter(None, text.split(" ")))
    return text.strip()


class _Decoder:
    """Decodes payloads in place, each as deep as it goes, within the limits."""

    def __init__(
        self, limits: NormalizationLimits, steps: dict[str, None], decoded: dict[str, None]
    ) -> None:
        self._limits = limits
        self._steps = steps
        self._decoded = decoded
        self._read = 0

    def run(self, text: str) -> str:
        """Decode passes over the whole text until one changes nothing."""
        rounds = self._limits.max_decode_rounds
        for _ in range(rounds):
            result = self._pass(text, 0)
            if result == text:
                return text
            _check_length("decoding", result, self._limits)
            text = result
        raise TextTooExpanded(
            "decoding",
            rounds + 1,
            rounds,
            f"the text still decodes to something new after {rounds} passes of the decoders "
            "(HTML entities, URL escapes, hex, base64; step 'decoding'): send the payload decoded",
            unit="rounds",
        )

    def _pass(self, text: str, layer: int) -> str:
        self._read += len(text)
        if self._read > self._limits.max_decode_chars:
            raise TextTooExpanded(
                "decoding",
                self._read,
                self._limits.max_decode_chars,
                f"decoding the text's encodings (HTML entities, URL escapes, hex, base64; step "
                f"'decoding') takes reading more than {self._limits.max_decode_chars:,} "
                "characters: send the payload decoded",
            )
        if "&#" in text:
            text = _sub(_ENTITIES_GATE, _ENTITIES, lambda m: self._entities(m[0], layer), text)
        if "%" in text:
            text = _sub(_PERCENT_GATE, _PERCENT, lambda m: self._percent(m[0], layer), text)
        if len(text) >= 16:
            text = _sub(_HEX_GATE, _HEX, lambda m: self._hex(m[0], layer), text)
            text = _sub(_BASE64_GATE, _BASE64, lambda m: self._base64(m[0], layer), text)
        return text

    def _deeper(self, plain: str, layer: int) -> str:
        """Decode what a payload decoded at `layer` holds in turn."""
        if layer + 1 > self._limits.max_decode_layers:
            raise TextTooExpanded(
                "decoding",
                layer + 1,
                self._limits.max_decode_layers,
                f"the text nests encodings (HTML entities, URL escapes, hex, base64) more than "
                f"{self._limits.max_decode_layers} layers deep (step 'decoding'): send the "
                "payload decoded",
                unit="layers",
            )
        return self._pass(plain, layer + 1)

    def _entities(self, encoded: str, layer: int) -> str:
        self._steps["html_entities_decoded"] = None
        return self._deeper(html.unescape(encoded), layer)

    def _percent(self, encoded: str, layer: int) -> str:
        # Only %XX escapes, as urllib.parse.unquote reads them (in C).
        plain = bytes.fromhex(encoded.replace("%", "")).decode("utf-8", "replace")
        return self._keep(plain, encoded, layer, "url_escapes_decoded")

    def _hex(self, encoded: str, layer: int) -> str:
        digits = encoded.replace("0x", "").replace("\\x", "").replace(" ", "").replace(":", "")
        try:
            plain = bytes.fromhex(digits).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return encoded
        return self._keep(plain, encoded, layer, "hex_decoded")

    def _base64(self, token: str, layer: int) -> str:
        if token.isalpha() or token.isdigit():
            return token  # a long word or number, not an encoding
        padded = token + "=" * (-len(token) % 4)
        try:
            if "-" in padded or "_" in padded:
                padded = padded.replace("-", "+").replace("_", "/")
            raw = binascii.a2b_base64(padded, strict_mode=True)  # b64decode(validate=True)
            plain = raw.decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return token
        return self._keep(plain, token, layer, "base64_decoded")

    def _keep(self, plain: str, encoded: str, layer: int, step: str) -> str:
        """Substitute a decoding, itself decoded further, when it reads as language."""
        if len(plain) < 4 or not _mostly_printable(plain):
            return encoded
        plain = self._deeper(plain, layer)
        if not _reads_as_text(plain):
            return encoded
        self._steps[step] = None
        self._decoded[plain] = None
        return plain


def _mostly_printable(text: str) -> bool:
    if text.isprintable():
        return True
    printable = sum(map(str.isprintable, text)) + text.count("\n") + text.count("\t")
    return printable >= 0.95 * len(text)


def _reads_as_text(plain: str) -> bool:
    """Language, not bytes: printable, and mostly letters and spaces."""
    if len(plain) < 4 or not _mostly_printable(plain):
        return False
    letters = sum(map(str.isalpha, plain)) + plain.count(" ")
    return letters >= 0.6 * len(plain)


def _fold_leet(text: str) -> str | None:
    if not _LEET_GATE.search(text):
        return None
    changed = False

    def replace(match: re.Match[str]) -> str:
        nonlocal changed
        word = match.group(0)
        if _LEET_CHARS.isdisjoint(word) or word.isdigit() or sum(map(str.isalpha, word)) < 2:
            return word
        changed = True
        return word.translate(_LEET)

    folded = _LEET_TOKEN.sub(replace, text)
    return folded if changed else None
