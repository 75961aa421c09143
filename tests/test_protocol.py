"""Turn parsing, answer extraction, output formatting and the prompt: pure functions, no sandbox."""

from __future__ import annotations

import ast
import contextlib
import io
import traceback

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tir_envs.protocol import (
    DEFAULT_SYSTEM_PROMPT,
    build_messages,
    display_last_expression,
    extract_boxed,
    find_code_blocks,
    format_output,
    format_rejection,
    parse_turn,
    render_prompt,
    truncate_middle,
)
from tir_envs.sandbox import ExecResult, ExecStatus


class TestCodeBlocks:
    def test_one_block_with_text_around(self):
        turn = parse_turn("First I square it.\n```python\nprint(12**2)\n```\nThen I check.")
        assert turn.tool_call and turn.code == "print(12**2)" and turn.format_error is None

    @pytest.mark.parametrize("tag", ["python", "py", "Python", "PYTHON3", "python "])
    def test_language_tags(self, tag):
        assert parse_turn(f"```{tag}\nx = 1\n```").code == "x = 1"

    @pytest.mark.parametrize("fence", ["```\nx = 1\n```", "```output\n1\n```", "```pyth\nx\n```"])
    def test_other_fences_are_not_tool_calls(self, fence):
        turn = parse_turn(f"{fence}\nSo \\boxed{{1}}")
        assert not turn.tool_call and turn.final_answer == "1"

    def test_several_blocks_run_concatenated_in_order(self):
        text = "```python\na = 2\n```\nnow use it\n```py\nprint(a * 3)\n```"
        turn = parse_turn(text)
        assert turn.num_blocks == 2 and turn.code == "a = 2\nprint(a * 3)"

    def test_first_and_last_block_selection(self):
        text = "```python\na = 2\n```\n```python\nb = 3\n```"
        assert parse_turn(text, blocks="first").code == "a = 2"
        assert parse_turn(text, blocks="last").code == "b = 3"
        with pytest.raises(ValueError, match="blocks"):
            parse_turn(text, blocks="middle")

    def test_unclosed_fence_is_invalid_and_keeps_the_code(self):
        turn = parse_turn("```python\nfor i in range(3):\n    print(i")
        assert turn.tool_call and turn.format_error == "unclosed_fence"
        assert turn.code.startswith("for i")

    def test_unclosed_last_block_invalidates_the_turn(self):
        turn = parse_turn("```python\na = 1\n```\n```python\nprint(a")
        assert turn.format_error == "unclosed_fence"
        assert (
            parse_turn("```python\na = 1\n```\n```python\nprint(a", blocks="first").format_error
            is None
        )

    @pytest.mark.parametrize("text", ["```python\n```", "```python\n   \n\n```", "```python```"])
    def test_empty_code(self, text):
        assert parse_turn(text).format_error == "empty_code"

    @pytest.mark.parametrize(
        "code",
        ["print(1", "def f(:\n    pass", "x = 1\n  y = 2", "a = '\x00'\x00", "(" * 300 + ")" * 300],
    )
    def test_code_that_does_not_parse(self, code):
        turn = parse_turn(f"```python\n{code}\n```")
        assert turn.format_error == "syntax_error"
        assert "Error" in turn.syntax_error

    def test_inline_and_indented_blocks(self):
        assert parse_turn("run ```python print(7)``` please").code == "print(7)"
        assert (
            parse_turn("1. step\n   ```python\n   x = 1\n   print(x)\n   ```").format_error is None
        )

    def test_box_in_a_tool_turn_is_not_an_answer(self):
        turn = parse_turn("```python\nprint(2)\n```\nSo the answer is \\boxed{2}.")
        assert turn.tool_call and turn.final_answer is None

    def test_odd_unicode_in_code(self):
        turn = parse_turn("```python\nπ = 3.14159\nprint('中文 😀', π)\n```")
        assert turn.format_error is None
        assert parse_turn("```python\nprint('\ud800')\n```").format_error == "syntax_error"

    def test_find_code_blocks_stops_at_unclosed(self):
        blocks = find_code_blocks("```python\na\n```\n```python\nb\n```\n```python\nc")
        assert [(b.code, b.closed) for b in blocks] == [("a", True), ("b", True), ("c", False)]


class TestBoxed:
    @pytest.mark.parametrize(
        "text, answer",
        [
            ("\\boxed{42}", "42"),
            ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
            ("\\boxed{\\sqrt{\\frac{a}{b^{2}}}}", "\\sqrt{\\frac{a}{b^{2}}}"),
            ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
            ("\\boxed{\\left\\{ x \\right\\}}", "\\left\\{ x \\right\\}"),
            ("\\boxed{1} then \\boxed{2}", "2"),
            ("\\boxed{1} then \\boxed{2", "1"),
            ("\\boxed { 7 }", "7"),
            ("$\\boxed 5$", "5"),
            ("\\fbox{9}", "9"),
            ("\\boxed{(1, 2)} and \\boxed{[0, \\infty)}", "[0, \\infty)"),
            ("\\boxed{\\text{(B)}}", "\\text{(B)}"),
            ("\\boxed{x \\\\ y}", "x \\\\ y"),
            ("\\boxed{π ≈ 3.14 😀}", "π ≈ 3.14 😀"),
            ("no box here", None),
            ("\\boxed", None),
            ("\\boxed{", None),
            ("\\boxedx{3}", None),
            ("", None),
        ],
    )
    def test_extract(self, text, answer):
        assert extract_boxed(text) == answer

    def test_final_turn(self):
        turn = parse_turn("The total is \\boxed{\\dfrac{3}{4}}.")
        assert not turn.tool_call and turn.final_answer == "\\dfrac{3}{4}" and turn.code == ""

    def test_empty_turn_is_final_without_answer(self):
        turn = parse_turn("")
        assert not turn.tool_call and turn.final_answer is None


def _run_in_process(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<cell>", "exec"), {})
    return out.getvalue()


class TestDisplayLastExpression:
    @pytest.mark.parametrize(
        "code, printed",
        [
            ("x = 6\nx * 7", "42\n"),
            ("x = 6\nx * 7  # the answer", "42\n"),
            ("a = 1; a + 1", "2\n"),
            ("(1 +\n 2)", "3\n"),
            ("'text'", "'text'\n"),
            ("print(5)", "5\n"),
            ("None", ""),
            ("x = 1", ""),
            ("x = 3\nx;", ""),
            ("for i in range(2):\n    i", ""),
            ("é = 2\né ** 3", "8\n"),
        ],
    )
    def test_like_a_notebook(self, code, printed):
        assert _run_in_process(display_last_expression(code)) == printed

    def test_traceback_line_numbers_are_kept(self):
        code = "a = 1\nb = 2\n1 / 0"
        try:
            _run_in_process(display_last_expression(code))
        except ZeroDivisionError as exc:
            assert traceback.extract_tb(exc.__traceback__)[-1].lineno == 3
        else:
            pytest.fail("expected ZeroDivisionError")

    def test_unparsable_code_is_returned_unchanged(self):
        assert display_last_expression("print(1") == "print(1"


class TestOutput:
    def test_stdout_then_stderr(self):
        result = ExecResult(ExecStatus.ERROR, "partial\n", "Traceback ...\nZeroDivisionError\n")
        assert (
            format_output(result) == "```output\npartial\nTraceback ...\nZeroDivisionError\n```\n"
        )

    def test_empty_output(self):
        assert format_output(ExecResult(ExecStatus.OK)) == "```output\n\n```\n"

    @pytest.mark.parametrize(
        "status, word",
        [
            (ExecStatus.TIMEOUT, "TimeoutError"),
            (ExecStatus.MEMORY, "MemoryError"),
            (ExecStatus.OUTPUT_LIMIT, "output limit"),
            (ExecStatus.INFRA_ERROR, "sandbox failed"),
        ],
    )
    def test_abnormal_ends_are_explained(self, status, word):
        assert word in format_output(ExecResult(status, "1\n"))

    def test_no_second_note_when_the_sandbox_explained(self):
        result = ExecResult(ExecStatus.TIMEOUT, "", "TimeoutError: the cell ran longer than 1 s\n")
        assert (
            format_output(result) == "```output\nTimeoutError: the cell ran longer than 1 s\n```\n"
        )

    def test_truncation_keeps_head_and_tail(self):
        text = "HEAD" + "x" * 10_000 + "TAIL"
        out = format_output(ExecResult(ExecStatus.OK, text), max_chars=100)
        assert "HEAD" in out and "TAIL" in out and "characters truncated" in out
        assert len(out) < 200
        assert truncate_middle("short", 100) == "short"

    def test_rejection(self):
        assert format_rejection("empty") == "```output\n[not run: empty]\n```\n"


class _ChatTokenizer:
    """The one method of a Hugging Face tokenizer that prompt rendering uses."""

    def __init__(self, system_role: bool = True):
        self.system_role = system_role

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        if not self.system_role and any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        turns = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return turns + "<|assistant|>"


class TestPrompt:
    def test_messages(self):
        messages = build_messages("What is 1+1?")
        assert messages == [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": "What is 1+1?"},
        ]
        assert build_messages("q", system_prompt=None, user_template="Problem: {question}") == [
            {"role": "user", "content": "Problem: q"}
        ]

    def test_instructions_state_the_protocol(self):
        for marker in ("```python", "```output", "\\boxed{}"):
            assert marker in DEFAULT_SYSTEM_PROMPT

    def test_raw_prompt(self):
        prompt = render_prompt("What is 1+1?")
        assert prompt.startswith(DEFAULT_SYSTEM_PROMPT) and prompt.endswith("What is 1+1?\n")

    def test_chat_template(self):
        prompt = render_prompt("Q?", tokenizer=_ChatTokenizer())
        assert prompt.startswith("<|system|>") and prompt.endswith("<|user|>Q?<|end|><|assistant|>")

    def test_template_without_system_role_folds_instructions_into_user(self):
        prompt = render_prompt("Q?", tokenizer=_ChatTokenizer(system_role=False))
        assert prompt.startswith("<|user|>" + DEFAULT_SYSTEM_PROMPT) and "Q?" in prompt


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("`pythonboxed{}\\\n x=1()\ud800😀;")), max_size=80))
def test_parsing_never_raises(text):
    turn = parse_turn(text)
    assert turn.tool_call == bool(find_code_blocks(text))
    extract_boxed(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_display_transform_keeps_code_valid(code):
    transformed = display_last_expression(code)
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        assert transformed == code
    else:
        ast.parse(transformed)
