"""Every prompt minibt uses: the chat template, the backward prompt, the forward tags, the rubric.

Base models (as in the paper) have no chat template; minibt sets CHAT_TEMPLATE on the tokenizer and
saves it with every adapter, so training, `minibt chat` and any transformers user format alike.
"""

from __future__ import annotations

import re

# Plain-text role markers work with any tokenizer, a locally trained toy BPE included.
# The assistant turn ends with EOS, so generation stops where training taught it to.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

# M_yx sees an output and writes the instruction it answers (the paper's backward model).
BACKWARD_SYSTEM = "Write the instruction that the following text is the answer to."

# The paper's 5-point rubric (Li et al. 2023, Table 19), verbatim but for whitespace.
RUBRIC = """Below is an instruction from an user and a candidate answer. Evaluate whether or not the answer is a good example of how AI Assistant should respond to the user's instruction. Please assign a score using the following 5-point scale:
1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked for. For example, some content seems missing, numbered list does not start from the beginning, the opening sentence repeats user's question. Or the response is from another person's perspective with their personal experience (e.g. taken from blog posts), or looks like an answer from a forum. Or it contains promotional text, navigation text, or other irrelevant information.
2: It means the answer addresses most of the asks from the user. It does not directly address the user's question. For example, it only provides a high-level methodology instead of the exact solution to user's question.
3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from the user. It is complete and self contained with the drawback that the response is not written from an AI assistant's perspective, but from other people's perspective. The content looks like an excerpt from a blog post, web page, or web search results. For example, it contains personal experience or opinion, mentions comments section, or share on social media, etc.
4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the instruction. It provide a complete, clear, and comprehensive response to user's question or instruction without missing or irrelevant information. It is well organized, self-contained, and written in a helpful tone. It has minor room for improvement, e.g. more concise and focused.
5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI Assistant, where the response looks like intentionally written to address the user's question or instruction without any irrelevant sentences. The answer provides high quality content, demonstrating expert knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful.

Please first provide a brief reasoning you used to derive the rating score, and then write "Score: <rating>" in the last line.

<instruction>
{instruction}
</instruction>

<answer>
{output}
</answer>"""

SCORE_PREFIX = "Score:"
SCORE_CHOICES = ("1", "2", "3", "4", "5")

Messages = list[dict[str, str]]


def backward_messages(output: str) -> Messages:
    return [{"role": "system", "content": BACKWARD_SYSTEM}, {"role": "user", "content": output}]


def forward_messages(instruction: str, tag: str | None = None) -> Messages:
    system = [{"role": "system", "content": tag}] if tag else []
    return system + [{"role": "user", "content": instruction}]


def rubric_messages(instruction: str, output: str) -> Messages:
    return [{"role": "user", "content": RUBRIC.format(instruction=instruction, output=output)}]


# Response rewriting (Back-and-Forth Translation, Nguyen et al. 2024): minibt's own short wording, not
# the paper's prompt; it goes in the user turn of a forward prompt (with the seed tag when tags are on).
# Short, because the toy world's context is 128 tokens.
REWRITE = """{instruction}

Answer it as an AI Assistant, with the content of this text:
{text}"""


def rewrite_request(instruction: str, text: str) -> str:
    return REWRITE.format(instruction=instruction, text=text)


# "Score: 4", "**Score:** 4", "**Score**: 4", "score = 3", "Score: 4/5", "Score: 4." ; not "Score: 10" nor "4.5"
_SCORE_RE = re.compile(r"score\**\s*[:=]?\s*\**\s*([1-5])(?!\d|\.\d)(?:\s*/\s*5)?", re.IGNORECASE)


def parse_score(text: str) -> int | None:
    """The last "Score: N" in a generated rating, tolerant of case, markdown and "N/5"; None if absent."""
    found = _SCORE_RE.findall(text)
    return int(found[-1]) if found else None


# `minibt eval`: a judge compares two answers; its next-token distribution over "A"/"B" after
# JUDGE_PREFIX is the verdict (one forward pass, nothing to parse). Both orders are asked.
JUDGE = """Below is an instruction from a user and two candidate answers, A and B. Decide which answer is the better response from an AI Assistant: the one that follows the instruction more exactly and is more helpful, correct, relevant and clearly written. The order of the answers and their length must not influence you.

<instruction>
{instruction}
</instruction>

<answer A>
{a}
</answer A>

<answer B>
{b}
</answer B>

Write the letter of the better answer after "Better answer:"."""

JUDGE_PREFIX = "Better answer:"
JUDGE_CHOICES = ("A", "B")


def judge_messages(instruction: str, a: str, b: str) -> Messages:
    return [{"role": "user", "content": JUDGE.format(instruction=instruction, a=a, b=b)}]
