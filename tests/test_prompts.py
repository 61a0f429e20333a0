"""Tests for kvkd.prompts: the teacher/student text layouts, their character spans (computed by
hand), the JSON round trip and token spans from offsets."""

from __future__ import annotations

import pytest

from kvkd.prompts import ANSWER_PREFIX, PromptTemplate, token_span


def test_teacher_text_spans_by_hand():
    text, cot, answer = PromptTemplate().teacher_text("Q?", "a=1", "42")
    assert text == "Q?\na=1\nThe answer is: 42"
    assert cot == (3, 6) and text[cot[0]:cot[1]] == "a=1"
    assert answer == (22, 24) and text[answer[0]:answer[1]] == "42"


def test_custom_template_and_student_text():
    t = PromptTemplate(question_suffix=" || ", cot_suffix=" ## ", answer_prefix="A:")
    text, cot, answer = t.teacher_text("q", "", "7")
    assert text == "q ||  ## A: 7" and cot == (5, 5) and text[answer[0]:answer[1]] == "7"
    assert t.question_text("q") == "q || "
    assert t.answer_text("1 1/2") == ("A: 1 1/2", (3, 8))
    assert PromptTemplate().answer_text("5") == (f"{ANSWER_PREFIX} 5", (15, 16))


def test_json_round_trip():
    t = PromptTemplate(question_suffix="\n\n", answer_prefix="Answer:")
    assert PromptTemplate.from_json(t.to_json()) == t
    assert PromptTemplate().to_json() == {"question_suffix": "\n", "cot_suffix": "\n", "answer_prefix": "The answer is:"}
    with pytest.raises(TypeError):
        PromptTemplate.from_json({"prefix": "x"})


@pytest.mark.parametrize(
    "span, expected",
    [
        ((0, 3), (0, 1)),  # exactly token 0
        ((2, 7), (0, 3)),  # partial overlaps at both ends count
        ((3, 4), (1, 2)),
        ((7, 9), (4, 5)),  # the zero-width token at 7 is skipped
        ((6, 9), (2, 5)),  # ... also inside a span: it is in [first, stop) but never a first or last token
        ((10, 12), (0, 0)),  # beyond the text
        ((4, 4), (1, 2)),  # an empty span inside a token gives that token
    ],
)
def test_token_span(span, expected):
    offsets = [(0, 3), (3, 5), (5, 7), (7, 7), (7, 9)]  # token 3 is zero-width (a special token)
    assert token_span(offsets, span) == expected


def test_token_span_with_a_real_tokenizer(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    text, _, answer = PromptTemplate().teacher_text("How many?", "2+2=4", "1,200")
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    first, stop = token_span(enc["offset_mapping"], answer)
    assert tok.decode(enc["input_ids"][first:stop]).strip() == "1,200"
