r"""The text protocol between a model and the TIR environments.

A model turn is plain text. It is a **tool turn** when it contains a ```` ```python ```` block (also
```` ```py ```` / ```` ```python3 ````, any case), otherwise it is the **final turn** and its last
``\boxed{...}`` is the answer. A turn with both a python block and ``\boxed{}`` is a tool turn: the
model has not seen its code's output yet, so its box is not an answer.

Rules, chosen to be predictable rather than clever:

- Several python blocks in one turn: by default (``blocks="all"``) they are concatenated in order
  and run as one cell, so nothing the model wrote is silently dropped; ``"first"`` and ``"last"``
  are options.
- A python fence with no closing ```` ``` ```` (generation cut off mid-code) is an invalid tool call
  and nothing runs: the code is incomplete.
- Empty code and code that does not parse (``ast.parse``) are invalid tool calls too. Unparsable
  code is not sent to the sandbox; its ``SyntaxError`` is reported as if it had run.
- Plain ```` ``` ```` fences and ```` ```output ```` blocks are not tool calls.
- ``\boxed{}`` may nest braces (``\boxed{\frac{1}{2}}``); escaped braces ``\{ \}`` do not count; the
  last complete box of the final turn wins; ``\fbox{}`` and ``\boxed 5`` are accepted.
- Like a notebook, a cell whose last statement is an expression prints that value's ``repr``
  (unless it is ``None`` or the line ends with ``;``).
"""

from __future__ import annotations

import ast
import re
import textwrap
import traceback
from dataclasses import dataclass
from typing import Any, Literal

from tir_envs.sandbox.base import ExecResult, ExecStatus

BlockSelection = Literal["all", "first", "last"]

DEFAULT_SYSTEM_PROMPT = (
    "Solve the math problem step by step. You can run Python: write code in a ```python block "
    "and end your turn there. The code runs and its printed output comes back to you in an "
    "```output block; variables and imports persist between blocks. Use code for calculations, "
    "enumeration and checks, and print what you need to see. When you know the answer, reply "
    "without any code block and put the final answer in \\boxed{}.\n\n"
    # One worked exchange: small models follow a shown protocol far more often than a described one.
    "Example.\nProblem: What is the remainder when 7^222 is divided by 1000?\n"
    "I will compute it with Python.\n```python\nprint(pow(7, 222, 1000))\n```\n"
    "```output\n49\n```\nThe remainder is \\boxed{49}."
)
DEFAULT_USER_TEMPLATE = "{question}"

_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)(?![\w+\-])", re.IGNORECASE)
_CLOSE_FENCE = "```"


_BOX = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{...}`` (or ``\fbox{}``, ``\boxed x``), else None.

    Braces nest and ``\{``/``\}`` are skipped, so ``\boxed{\{1, \frac{1}{2}\}}`` works; an
    unclosed last box falls back to the complete one before it. The turn parser, the data loaders
    and the grader use this one reading of a box.
    """
    answer = None
    for match in _BOX.finditer(text):
        content = _box_content(text, match.end())
        if content is not None:
            answer = content
    return answer


extract_boxed = last_boxed
"""Alias of :func:`last_boxed`."""


def _box_content(text: str, pos: int) -> str | None:
    rest = text[pos:]
    stripped = rest.lstrip()
    if not stripped:
        return None
    if stripped[0] != "{":
        # ``\boxed 5``: one token, up to whitespace or a closing ``$``.
        if rest[:1] not in (" ", "\t"):
            return None
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    start = pos + (len(rest) - len(stripped)) + 1
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped char (``\{``, ``\}``, ``\\``) or a command's first letter
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


@dataclass(frozen=True)
class CodeBlock:
    code: str
    closed: bool


@dataclass(frozen=True)
class ParsedTurn:
    """What one assistant turn asks for.

    ``tool_call`` is True when the turn has a python block (valid or not); ``format_error`` names
    what is wrong with the tool call (``unclosed_fence``, ``empty_code``, ``syntax_error``) or is
    None; ``code`` is the selected code (``""`` when the turn has no block); ``final_answer`` is the
    content of the last ``\\boxed{}`` of a final turn.
    """

    tool_call: bool
    code: str
    format_error: str | None = None
    syntax_error: str | None = None
    final_answer: str | None = None
    num_blocks: int = 0


def find_code_blocks(text: str) -> list[CodeBlock]:
    """All python blocks in order; an unclosed one runs to the end of the text and ends the scan."""
    blocks = []
    pos = 0
    while True:
        match = _OPEN_FENCE.search(text, pos)
        if match is None:
            return blocks
        start = match.end()
        end = text.find(_CLOSE_FENCE, start)
        closed = end != -1
        body = text[start:end] if closed else text[start:]
        blocks.append(CodeBlock(code=_clean_code(body), closed=closed))
        if not closed:
            return blocks
        pos = end + len(_CLOSE_FENCE)


def _clean_code(body: str) -> str:
    # The fence line may carry trailing spaces; a block indented inside a markdown list is dedented.
    first, newline, rest = body.partition("\n")
    if newline and not first.strip():
        body = rest
    return textwrap.dedent(body).strip("\n")


def parse_turn(text: str, blocks: BlockSelection = "all") -> ParsedTurn:
    """Classify one assistant turn and pull out its code or its final answer."""
    found = find_code_blocks(text)
    if not found:
        return ParsedTurn(tool_call=False, code="", final_answer=last_boxed(text))
    if blocks == "all":
        selected = found
    elif blocks == "first":
        selected = found[:1]
    elif blocks == "last":
        selected = found[-1:]
    else:
        raise ValueError(f"blocks must be 'all', 'first' or 'last', got {blocks!r}")
    code = "\n".join(block.code for block in selected)
    if not all(block.closed for block in selected):
        problem, error = "unclosed_fence", None
    elif not code.strip():
        problem, error = "empty_code", None
    else:
        error = syntax_error(code)
        problem = "syntax_error" if error else None
    return ParsedTurn(
        tool_call=True, code=code, format_error=problem, syntax_error=error, num_blocks=len(found)
    )


def syntax_error(code: str) -> str | None:
    """The formatted ``SyntaxError`` that running ``code`` would raise, or None if it parses."""
    try:
        ast.parse(code, filename="<cell>")
    except SyntaxError as exc:
        return "".join(traceback.format_exception_only(exc)).rstrip()
    except (ValueError, RecursionError, MemoryError, OverflowError) as exc:
        # ast.parse's other failures: null bytes, nesting deeper than the parser's stack.
        return f"SyntaxError: {type(exc).__name__}: {exc}"
    return None


def display_last_expression(code: str) -> str:
    """Make a cell print its last expression's value, as a notebook would (else return it as is).

    The source before the expression is kept byte for byte so traceback line numbers stay right.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    node = tree.body[-1]
    lines = code.splitlines(keepends=True)
    offset = sum(len(line) for line in lines[: node.lineno - 1])
    # col_offset is in UTF-8 bytes.
    line = lines[node.lineno - 1]
    offset += len(line.encode("utf-8")[: node.col_offset].decode("utf-8", errors="ignore"))
    wrapped = (
        code[:offset]
        + "(lambda __tir_value: __tir_value is None or print(repr(__tir_value)))("
        + code[offset:]
        + "\n)"
    )
    try:
        ast.parse(wrapped)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return code  # e.g. a trailing ``;``, which suppresses display in notebooks too
    return wrapped


_STATUS_NOTES = {
    ExecStatus.TIMEOUT: "TimeoutError: the code ran past the time limit and was stopped.",
    ExecStatus.MEMORY: "MemoryError: the code ran past the memory limit and was stopped.",
    ExecStatus.OUTPUT_LIMIT: "[output limit reached: the rest of the output was dropped]",
    ExecStatus.INFRA_ERROR: "[the sandbox failed to run this code; this is not an error in it]",
}


def truncate_middle(text: str, max_chars: int) -> str:
    """Keep the head and the tail (where tracebacks end) of an overlong text."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n... [{cut} characters truncated] ...\n{text[len(text) - half :]}"


def format_output(result: ExecResult, max_chars: int = 2048) -> str:
    """The observation for a tool turn: stdout, then stderr (where the sandbox explains timeouts,
    memory kills and restarts; a short note stands in when it did not)."""
    parts = [part.rstrip("\n") for part in (result.stdout, result.stderr) if part.strip()]
    if result.status in _STATUS_NOTES and not result.stderr.strip():
        parts.append(_STATUS_NOTES[result.status])  # sandboxes normally explain in stderr
    body = truncate_middle("\n".join(parts), max_chars)
    return f"```output\n{body}\n```\n"


def format_rejection(message: str) -> str:
    """The observation for a tool call that did not run (unclosed fence, empty code, too long)."""
    return f"```output\n[not run: {message}]\n```\n"


def build_messages(
    question: str,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    user_template: str = DEFAULT_USER_TEMPLATE,
) -> list[dict[str, str]]:
    """Chat messages: the protocol instructions as the system turn, then the question."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_template.format(question=question)})
    return messages


def render_prompt(
    question: str,
    tokenizer: Any = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    user_template: str = DEFAULT_USER_TEMPLATE,
) -> str:
    """The prompt text: through ``tokenizer.apply_chat_template`` when given, else plain text.

    Chat templates without a system role (they raise) get the instructions folded into the user
    turn.
    """
    messages = build_messages(question, system_prompt, user_template)
    if tokenizer is None:
        return "\n\n".join(m["content"] for m in messages) + "\n"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja2 raises its own TemplateError types for "system role not supported"
        if len(messages) == 1:
            raise
        merged = [
            {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        ]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
