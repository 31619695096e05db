"""The generated-rating parser on the messy outputs real curators write."""

from __future__ import annotations

import pytest

from minibt.prompts import parse_score


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is complete.\nScore: 4", 4),
        ("Score:5", 5),
        ("reasoning...\nscore: 3", 3),
        ("SCORE: 2", 2),
        ("**Score:** 4", 4),  # markdown, colon inside the bold
        ("**Score**: 5", 5),  # markdown, colon after the bold
        ("## Score: 3", 3),
        ("Score: 4/5", 4),
        ("Score: 4 / 5", 4),
        ("score = 3", 3),
        ("Score: 4.", 4),  # end of a sentence
        ("It is clear and focused.\n\nScore:\n5", 5),  # the number on the next line
        ("Score: 2 ... on reflection, Score: 4", 4),  # several scores: the last one counts
        ("I would give a score of 5 at first. Final Score: 3", 3),
    ],
)
def test_parse_score_reads_messy_ratings(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The answer is good and helpful.",  # no score at all
        "Rating: 4",  # another word
        "Score: 10",  # out of the 1-5 scale, not a "1"
        "Score: 0",
        "Score: 4.5",  # not an integer rating
        "Score: excellent",
    ],
)
def test_parse_score_gives_none_without_a_valid_score(text):
    assert parse_score(text) is None
