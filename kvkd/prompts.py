"""Prompt templates and the token spans that extraction, training and evaluation agree on.

Teacher text (one string, tokenized once, spans from character offsets)::

    {question}\\n{trace}\\n{answer_prefix}{answer}

Student text (CODI latent mode, Shen et al. 2025)::

    {question}\\n <bot> z_1 .. z_M <eot> {answer_prefix}{answer}<eos>

Every side finds the *answer boundary* (the last token before the first answer token,
whose hidden state is CODI's distillation target) from the character offsets of its own
tokenization, so teachers and students may tokenize differently.
"""

from __future__ import annotations

from dataclasses import dataclass

ANSWER_PREFIX = "The answer is:"


@dataclass(frozen=True)
class PromptTemplate:
    """The text layout shared by teachers and students (recorded in cache metadata).

    Attributes:
        question_suffix: text appended to the question (before the CoT or ``<bot>``).
        cot_suffix: text between the CoT and the answer prefix.
        answer_prefix: text before the answer (CODI: "The answer is:").
    """

    question_suffix: str = "\n"
    cot_suffix: str = "\n"
    answer_prefix: str = ANSWER_PREFIX

    def to_json(self) -> dict:
        return {"question_suffix": self.question_suffix, "cot_suffix": self.cot_suffix, "answer_prefix": self.answer_prefix}

    @classmethod
    def from_json(cls, data: dict) -> "PromptTemplate":
        return cls(**data)

    def teacher_text(self, question: str, trace: str, answer: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
        """The teacher's text and the character spans of its CoT and of its answer.

        Returns:
            (text, cot_span, answer_span), spans as [start, end) character offsets.
        """
        head = question + self.question_suffix
        cot_start = len(head)
        text = head + trace
        cot_end = len(text)
        text += self.cot_suffix + self.answer_prefix + " "
        answer_start = len(text)
        text += answer
        return text, (cot_start, cot_end), (answer_start, len(text))

    def question_text(self, question: str) -> str:
        """The student's text before ``<bot>``."""
        return question + self.question_suffix

    def answer_text(self, answer: str) -> tuple[str, tuple[int, int]]:
        """The student's text after ``<eot>`` and the character span of the answer in it."""
        head = self.answer_prefix + " "
        return head + answer, (len(head), len(head) + len(answer))


def token_span(offsets: list[tuple[int, int]], span: tuple[int, int]) -> tuple[int, int]:
    """Token indices [first, last+1) of the tokens overlapping a character span.

    Args:
        offsets: per-token (start, end) character offsets from a fast tokenizer.
        span: [start, end) characters.
    Returns:
        (first, stop); (0, 0) if no token overlaps.
    """
    start, end = span
    hits = [i for i, (a, b) in enumerate(offsets) if b > start and a < end and b > a]
    if not hits:
        return 0, 0
    return hits[0], hits[-1] + 1
