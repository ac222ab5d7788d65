"""The text pieces the safety checks share (medlora.safety.text), on exact values."""

from __future__ import annotations

import re

from medlora.safety.text import (
    clause_starts,
    negated,
    normalise,
    sentence_spans,
    sentences,
)

TEXT = "Dr. Lee said take 2.5 mg; then rest!\n\nCall us?OK"


def test_sentences_end_at_marks_and_keep_the_point_in_a_dose():
    # abbreviations are not special, under either rule
    assert sentence_spans(TEXT) == [(0, 3), (3, 25), (25, 36), (38, 46), (46, 48)]
    assert sentences(TEXT) == ["Dr.", " Lee said take 2.5 mg;", " then rest!", "Call us?", "OK"]


def test_blank_lines_are_kept_on_request_so_the_spans_tile_the_text():
    kept = sentence_spans(TEXT, keep_blank=True)
    assert [TEXT[a:b] for a, b in kept] == ["Dr.", " Lee said take 2.5 mg;", " then rest!", "\n\n", "Call us?", "OK"]
    assert "".join(TEXT[a:b] for a, b in kept) == TEXT


def test_cut_at_the_space_drops_it_and_ignores_semicolons_and_unspaced_marks():
    assert sentences(TEXT, cut="space") == ["Dr.", "Lee said take 2.5 mg; then rest!", "Call us?OK"]


def test_titled_cut_keeps_titles_and_initials_with_their_names_and_trims_each_sentence():
    note = "  Seen by Dr. Lee and J. Smith today. BP 150/95. pt ok.\nPlan: f/u in 2 wk!  "
    assert sentences(note, cut="titled") == [
        "Seen by Dr. Lee and J. Smith today.",
        "BP 150/95. pt ok.",
        "Plan: f/u in 2 wk!",
    ]
    assert sentence_spans(note, cut="titled")[0] == (2, 37)


def test_normalise():
    assert normalise("  He\u2019s  FINE\t&\u2014 \u201cok\u201d \n Next ") == 'he\'s fine and - "ok"\nnext'


def test_clause_starts_at_or_after_the_break():
    breaks = re.compile(r",|\bnow\b")
    sentence = "she had a stroke, now she can't lift her arm"
    assert clause_starts(sentence, breaks) == [0, 16, 18]
    assert clause_starts(sentence, breaks, with_break=False) == [0, 17, 21]
    assert clause_starts("no break here", breaks) == [0]


CUES = re.compile(r"\b(?:no|not|denies)\b")
BREAKS = re.compile(r"\bbut\b|[,:]")


def test_negation_reaches_a_few_words_and_stops_at_a_break():
    assert negated("not one two three ", CUES, 3)
    assert not negated("not one two three four ", CUES, 3)
    assert negated("not one two three four ", CUES)  # no window: anywhere before
    assert not negated("she denies fever but has ", CUES, 6, breaks=BREAKS)
    assert not negated("nothing here ", CUES)


def test_negation_through_a_negated_list_and_past_pseudo_negations():
    assert negated("no fever, cough or ", CUES, 6, breaks=BREAKS, lists=True)
    assert not negated("no fever, cough or ", CUES, 6, breaks=BREAKS)
    pseudo = re.compile(r"\bnot sure\b")
    assert negated("i'm not sure it is ", CUES, 6)
    assert not negated("i'm not sure it is ", CUES, 6, pseudo=pseudo)
    # a blanked phrase still counts as one word of the window
    assert not negated("no a not sure b ", CUES, 2, pseudo=pseudo)
    assert negated("no a not sure b ", CUES, 3, pseudo=pseudo)
