"""The text handling the safety checks share: normalisation, sentence spans, clause starts, negation scope.

Each check keeps its own vocabularies (which words break a clause, which words negate); this module applies
them, so each way of ending a sentence or bounding a "not" is written once. Where the callers' rules really
differ, a parameter names the difference:
- triage (medlora.safety.triage) judges user messages: `normalise`, `sentence_spans`, `clause_starts`, and
  `negated` with breaks, pseudo-negations and lists;
- output checks (medlora.safety.output_checks) judge a reply they may rewrite sentence by sentence:
  `sentence_spans(keep_blank=True)`, so the spans tile the reply, and `negated` over a few words;
- the content filter (medlora.safety.content) judges training replies as written (its patterns ignore case):
  `sentences(cut="space")`, `clause_starts(with_break=False)`, and `negated` over a clause.
"""

from __future__ import annotations

import re
from typing import Literal

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - "})


def normalise(text: str) -> str:
    """Lower case, straight quotes, single spaces (newlines kept: they end sentences)."""
    text = text.translate(_QUOTES).lower().replace("&", " and ")
    return "\n".join(re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n"))


# The `gap` group is the part of a sentence end that belongs to no sentence.
_SENTENCE_END = {
    # after ! or ?, after . or ; before a space or the end (not the point in "2.5 mg"), after line breaks;
    # the mark stays with its sentence, the space after it opens the next
    "mark": re.compile(r"(?:[!?]+|[.;]+(?=\s|$)|\n+)(?P<gap>)"),
    # at the space after . ! or ?, or at line breaks; ";" and "wait!what" do not end a sentence
    "space": re.compile(r"(?P<gap>(?<=[.!?])\s+|\n+)"),
}


# "titled": a sentence runs to . ! or ? where whitespace and a capital, digit, bracket or quote follow,
# unless the mark ends a title or an initial ("Dr. Lee", "J. Smith"), or to a line break; for clinical
# notes, where names follow titles
_TITLED = re.compile(
    r"[^\n]*?(?:(?<!\bDr)(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bSt)(?<!\bJr)(?<!\bSr)(?<!\bvs)(?<!\b[A-Z])"
    r"[.!?](?=\s+[A-Z\d(\"'])|(?=\n)|$)"
)


def sentence_spans(
    text: str, *, cut: Literal["mark", "space", "titled"] = "mark", keep_blank: bool = False
) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text`. Under "mark" and "space" abbreviations are not special
    ("Dr. Lee" is two sentences); "titled" keeps a title or an initial with the name after it and gives
    each sentence without the whitespace around it (keep_blank does not apply).

    keep_blank keeps the pieces that are only whitespace (a blank line); with cut="mark" the spans then tile
    `text`, so joining the spans one keeps gives back the rest of the text with its spacing.
    """
    if cut == "titled":
        trimmed = []
        for m in _TITLED.finditer(text):
            piece = m.group()
            if piece.strip():
                trimmed.append((m.start() + len(piece) - len(piece.lstrip()), m.start() + len(piece.rstrip())))
        return trimmed
    spans, start = [], 0
    for m in _SENTENCE_END[cut].finditer(text):
        spans.append((start, m.start("gap")))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if b > a and (keep_blank or text[a:b].strip())]


def sentences(text: str, *, cut: Literal["mark", "space", "titled"] = "mark", keep_blank: bool = False) -> list[str]:
    """The sentences of `text` as strings: see `sentence_spans`."""
    return [text[a:b] for a, b in sentence_spans(text, cut=cut, keep_blank=keep_blank)]


def clause_starts(text: str, breaks: re.Pattern, *, with_break: bool = True) -> list[int]:
    """Where each clause of `text` starts: 0, then at every match of `breaks` (a comma, "but", ...).

    with_break starts the clause at the break, so a break word that says something ("now", "then") is part
    of the clause it opens; without it the clause starts just after the break.
    """
    return [0] + [m.start() if with_break else m.end() for m in breaks.finditer(text)]


_WORD = re.compile(r"\w+")
# "no fever, cough or chest pain": the comma lists what "no" denies
_LIST_JOIN = re.compile(r"\b(?:or|nor)\b")


def negated(
    before: str,
    cues: re.Pattern,
    words: int | None = None,
    *,
    breaks: re.Pattern | None = None,
    pseudo: re.Pattern | None = None,
    lists: bool = False,
) -> bool:
    """Is the end of `before` (the text up to a match) in the scope of a negation cue?

    It is when the last match of `cues` is at most `words` words back (None: anywhere in `before`), and no
    match of `breaks` ("but", a comma) lies between. `pseudo` matches phrases that contain a cue but deny
    nothing ("not sure", "no idea"); they are blanked first, and each still counts as one word. With `lists`,
    a comma or colon followed later by "or"/"nor" is inside a negated list and does not break the scope.
    """
    if pseudo is not None:
        before = pseudo.sub(lambda m: "_" * len(m.group()), before)
    scope_start = 0
    for brk in breaks.finditer(before) if breaks is not None else ():
        if lists and brk.group() in ",:" and _LIST_JOIN.search(before[brk.end() :]):
            continue
        scope_start = brk.end()
    scope = before[scope_start:]
    found = list(cues.finditer(scope))
    if not found:
        return False
    last = found[-1]
    return words is None or len(_WORD.findall(scope[last.end() :])) <= words
