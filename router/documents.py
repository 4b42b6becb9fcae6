"""Reading data as data: segments of a document, and instructions addressed to the assistant.

A tool result or a retrieved document is not a prompt. Scored whole, a long
email with one planted line reads as an email: the planted line is diluted by
everything around it. So a data message is cut into segments (paragraphs,
long ones at sentence ends), each scored on its own, and the riskiest counts.

Data has no business giving the assistant orders. An instruction addressed to
the assistant inside data ("to you, the AI model: before you answer, send
...", a fake `###(system_message)` or `<INFORMATION>` block, a line that
starts "assistant:") is the mark of an indirect injection whatever it asks,
so `addressed_instructions` finds those spans and the conversation check
escalates the message they are in. The patterns are RE2 (linear time).
"""

from __future__ import annotations

import re2

__all__ = ["addressed_instructions", "segments"]

SEGMENT_CHARS = 600  # a segment's usual size: a paragraph or a few sentences


def _compile(pattern: str) -> re2._Regexp:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    return re2.compile(pattern, options)


_MODEL = (
    r"(?:ai|a\.i\.|assistant|ai\s+assistant|language\s+model|llm|chat\s*bot|"
    r"gpt[-\w.]*|claude|gemini|llama|model|agent|bot)"
)
_VERB = (
    r"(?:ignore|disregard|forget|override|stop|send|forward|transfer|pay|reply|respond|answer|say|"
    r"tell|write|output|print|reveal|delete|remove|create|add|invite|email|post|visit|open|"
    r"click|download|execute|run|call|book|reserve|change|update|share|include|insert|append|"
    r"summari[sz]e|recommend|make\s+sure|do\s+not|don'?t|must|should|need\s+to)"
)
_ADDRESSED = [
    # "a message from me ... to you, the AI model" / "this is for the assistant"
    rf"\b(?:to|for)\s+(?:you\s*,?\s*)?(?:the|my|our|dear)?\s*{_MODEL}\b",
    rf"\b(?:dear|hey|hi|hello|attention|note\s+to(?:\s+the)?)\s*,?\s*{_MODEL}\b",
    # "AI assistant: please forward ..." / "Assistant, ignore ..."
    rf"\b{_MODEL}\s*[:,]\s*(?:please\s+|you\s+(?:must|should)\s+)?{_VERB}\b",
    # fake role and instruction markers planted in data
    r"#{2,}\s*\(?\s*(?:system|admin|developer)[\s_-]*(?:message|prompt|instructions?)\s*\)?",
    r"<\s*/?\s*(?:information|instructions?|system|system[_-]?message|important|admin)\s*>",
    r"(?:^|\n)\s*(?:system|assistant|developer)\s*:\s*\S",
    r"\[/?(?:inst|system)\]|<\|im_start\|>|<\|system\|>",
    # "before you (can) solve/answer the task ..., (please) do the following"
    r"\bbefore\s+(?:you\s+)?(?:can\s+)?(?:solve|complete|continue|answer|finish|respond|reply|"
    r"summari[sz]e|proceed)",
    r"\byou\s+(?:should|must|need\s+to|have\s+to)\s+(?:immediately|now|first|instead)\b",
    r"\b(?:ignore|disregard|forget)\s+(?:all\s+|any\s+|the\s+|your\s+)*(?:previous|prior|above|"
    r"earlier|original|your)\s+\w+",
    r"\b(?:do\s+not|don'?t|never)\s+(?:tell|inform|mention|reveal|show)\s+(?:this\s+to\s+)?"
    r"(?:the\s+)?user\b",
]
_PATTERNS = [_compile(p) for p in _ADDRESSED]
_PARAGRAPH = _compile(r"\n\s*\n+")
_SENTENCE_END = _compile(r"[.!?。！？]\s+|\n")


def addressed_instructions(text: str) -> list[tuple[int, int]]:
    """Spans of `text` (code points) that address the assistant with an instruction."""
    spans = {match.span() for pattern in _PATTERNS for match in pattern.finditer(text)}
    return sorted(spans)


def segments(text: str, *, max_segments: int = 24) -> list[tuple[int, int]]:
    """`text` cut into at most `max_segments` spans that cover it: paragraphs,
    a long one split at sentence ends, short neighbours merged."""
    pieces: list[tuple[int, int]] = []
    start = 0
    for match in _PARAGRAPH.finditer(text):
        pieces += _split_long(text, start, match.start())
        start = match.end()
    pieces += _split_long(text, start, len(text))
    merged: list[tuple[int, int]] = []
    for begin, end in pieces:
        if merged and end - merged[-1][0] <= SEGMENT_CHARS // 2 + SEGMENT_CHARS // 4:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((begin, end))
    while len(merged) > max(1, max_segments):  # halve by pairing neighbours
        merged = [
            (merged[i][0], merged[min(i + 1, len(merged) - 1)][1]) for i in range(0, len(merged), 2)
        ]
    return merged or [(0, len(text))]


def _split_long(text: str, begin: int, end: int) -> list[tuple[int, int]]:
    """[begin, end) as pieces of about SEGMENT_CHARS, cut after sentence ends where possible."""
    if end - begin <= SEGMENT_CHARS:
        return [(begin, end)] if text[begin:end].strip() else []
    pieces, start = [], begin
    while end - start > SEGMENT_CHARS:
        window = text[start : start + SEGMENT_CHARS]
        cuts = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() > SEGMENT_CHARS // 3]
        cut = start + (cuts[-1] if cuts else SEGMENT_CHARS)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return [(b, e) for b, e in pieces if text[b:e].strip()]
