"""AUTOMATIC1111's prompt attention syntax: a prompt -> ``[[text, weight], ...]``, as A1111's
``modules/prompt_parser.py:parse_prompt_attention`` parses it.

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``((text))`` by 1.21; ``[text]`` divides it by 1.1;
- ``(text:1.5)`` multiplies it by 1.5 (a signed decimal: ``[+-]?[.0-9]+``);
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a lone ``\\`` is dropped (A1111's
  ``text[1:]`` of it);
- brackets left open at the end close there (``(unbalanced`` weighs 1.1); a closing bracket with nothing open is
  literal text; runs of equal weight merge;
- ``BREAK`` (uppercase, a word on its own) becomes the marker ``["BREAK", -1]``, which ends a chunk early
  (:mod:`sd_jax.pipelines.long_prompts`). Inside brackets it stays a break: A1111 multiplies the marker's -1
  too and then encodes the word "BREAK" at weight -1.1 (a negated hidden state), which we take for a bug.

As in A1111, ``:x)`` with a non-numeric ``x`` is literal text: ``(word:abc)`` is ``[["word:abc", 1.1]]``. Where
A1111 would crash (``float("1.2.3")`` on ``(word:1.2.3)`` or ``(word:.)``), :func:`parse_prompt_attention` raises
a one-line ``ValueError`` naming the position in the prompt instead.
"""

from __future__ import annotations

import re

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK = "BREAK"

# One token of the syntax a time, tried in order (A1111's alternatives): escapes, a lone backslash, openers, a
# weight closing a round bracket, closers, plain text, a lone colon.
_TOKEN = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\
    | \( | \[
    | :(?P<weight>[+-]?[.\d]+)\)
    | \) | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """``[[text, weight], ...]`` of ``text`` (A1111's ``parse_prompt_attention``; see the module docstring).

    >>> parse_prompt_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    res: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, by: float) -> None:
        for item in res[start:]:
            if item[1] != -1 or item[0] != BREAK:  # the BREAK marker keeps its -1 (A1111 scales it: see above)
                item[1] *= by

    for m in _TOKEN.finditer(text):
        piece, weight = m.group(0), m.group("weight")
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])  # a lone backslash is dropped, as in A1111
        elif piece == "(":
            rounds.append(len(res))
        elif piece == "[":
            squares.append(len(res))
        elif weight is not None and rounds:
            scale(rounds.pop(), _weight(weight, text, m.start()))
        elif piece == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    res.append([BREAK, -1])
                res.append([part, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


def _weight(value: str, prompt: str, at: int) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"prompt position {at}: weight {value!r} in {prompt[max(0, at - 20) : at + len(value) + 2]!r} is not a "
            "number; write (text:1.2), or escape the brackets as \\( \\)"
        ) from None
