"""The A1111 attention parser: the examples of A1111's ``parse_prompt_attention`` docstring (as our own table),
edge cases read from its regex, and the inputs A1111 would crash on."""

import pytest

from sd_jax.prompt_parser import parse_prompt_attention

# A1111's documented examples, outputs exact (the float products in A1111's order).
A1111_VECTORS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
         [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]],
    ),
]  # fmt: skip

MORE = [
    ("((text))", [["text", 1.1 * 1.1]]),
    ("[text]", [["text", 1 / 1.1]]),
    ("[[text]]", [["text", 1 / 1.1 / 1.1]]),
    ("(text:1.5)", [["text", 1.5]]),
    ("(text:-0.5) x", [["text", -0.5], [" x", 1.0]]),
    ("((a:1.5))", [["a", 1.5 * 1.1]]),
    ("[unbalanced", [["unbalanced", 1 / 1.1]]),
    ("a) b] c", [["a) b] c", 1.0]]),  # closers with nothing open are text
    ("(word:abc)", [["word:abc", 1.1]]),  # a non-numeric weight is text, its bracket still x1.1
    ("word:1.5)", [["word:1.5)", 1.0]]),  # a weight with no open bracket is text
    ("a\\b", [["ab", 1.0]]),  # a lone backslash is dropped
    ("a\\\\b", [["a\\b", 1.0]]),
    ("\\(x\\) \\[y\\]", [["(x) [y]", 1.0]]),
    ("a: b", [["a: b", 1.0]]),
    ("", [["", 1.0]]),
    ("cat BREAK dog", [["cat", 1.0], ["BREAK", -1], ["dog", 1.0]]),
    ("cat break dog", [["cat break dog", 1.0]]),  # BREAK is uppercase only
    ("(cat BREAK dog)", [["cat", 1.1], ["BREAK", -1], ["dog", 1.1]]),  # deviation: A1111 scales the marker too
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_VECTORS + MORE)
def test_parse_matches_a1111(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize(("prompt", "where"), [("(word:1.2.3)", "position 5"), ("an (x:.) y", "position 5")])
def test_malformed_weight_is_one_line_error(prompt, where):
    with pytest.raises(ValueError, match=where) as e:
        parse_prompt_attention(prompt)
    assert "\n" not in str(e.value) and "is not a number" in str(e.value)
