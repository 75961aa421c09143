"""``TIRMathEnv``: one math problem per episode, solved over several turns with a Python tool."""

from __future__ import annotations

import logging
import multiprocessing
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
from gymnasium.error import ResetNeeded
from gymnasium.spaces import Text
from gymnasium.vector.utils import (
    create_shared_memory,
    read_from_shared_memory,
    write_to_shared_memory,
)

from tir_envs import DEFAULT_MAX_TURNS, data, grading
from tir_envs.data import Problem
from tir_envs.procedural import ProceduralProblems
from tir_envs.protocol import (
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_USER_TEMPLATE,
    BlockSelection,
    build_messages,
    display_last_expression,
    format_output,
    format_rejection,
    parse_turn,
    render_prompt,
)
from tir_envs.rewards import RewardFn, TurnOutcome, TurnReward
from tir_envs.sandbox import ExecResult, ExecStatus, Sandbox, SandboxError, Session, make_sandbox

logger = logging.getLogger(__name__)


class UnicodeText(Text):
    """A ``Text`` space that contains every string up to ``max_length`` characters.

    Gymnasium's ``Text`` checks each character against an explicit charset; listing all of Unicode
    would cost hundreds of MB. ``contains`` here accepts any ``str``; the charset only drives
    ``sample``.
    """

    def __init__(self, max_length: int, *, min_length: int = 0, seed: Any = None):
        charset = string.printable + "αβγπ√∑∫≤≥≠×÷°€中文😀\u200b"
        super().__init__(max_length, min_length=min_length, charset=charset, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"


# AsyncVectorEnv passes observations through shared memory by default. Gymnasium's Text codec maps
# characters through the charset and reads the buffer once into an immutable tuple, so text
# observations would never update. These handlers store UTF-32 code points behind a length and hand
# out a live view; ``deepcopy`` of the view (what AsyncVectorEnv returns) is a plain tuple of str.


class SharedTextBatch(Sequence):
    """A live view of ``n`` strings in a shared int32 buffer: ``[length, code points...]`` each."""

    def __init__(self, buffer: Any, n: int, max_length: int):
        self._buffer, self._n, self._stride = buffer, n, max_length + 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(self._n)))
        if not -self._n <= index < self._n:
            raise IndexError(index)
        slots = np.frombuffer(self._buffer.get_obj(), dtype=np.int32)
        start = (index % self._n) * self._stride
        codes = slots[start + 1 : start + 1 + slots[start]]
        return codes.tobytes().decode("utf-32-le", errors="surrogatepass")

    def __deepcopy__(self, memo: dict) -> tuple[str, ...]:
        return tuple(self)

    def __repr__(self) -> str:
        return f"SharedTextBatch({tuple(self)!r})"


@create_shared_memory.register(UnicodeText)
def _create_shared_text(space: UnicodeText, n: int = 1, ctx: Any = multiprocessing) -> Any:
    return ctx.Array(np.dtype(np.int32).char, n * (space.max_length + 1))


@read_from_shared_memory.register(UnicodeText)
def _read_shared_text(space: UnicodeText, shared_memory: Any, n: int = 1) -> SharedTextBatch:
    return SharedTextBatch(shared_memory, n, space.max_length)


@write_to_shared_memory.register(UnicodeText)
def _write_shared_text(space: UnicodeText, index: int, value: str, shared_memory: Any) -> None:
    codes = np.frombuffer(value.encode("utf-32-le", errors="surrogatepass"), dtype=np.int32)
    if len(codes) > space.max_length:
        raise ValueError(f"text of {len(codes)} characters exceeds the space's {space.max_length}")
    slots = np.frombuffer(shared_memory.get_obj(), dtype=np.int32)
    start = index * (space.max_length + 1)
    slots[start] = len(codes)
    slots[start + 1 : start + 1 + len(codes)] = codes


ProblemSource = Any
"""Anything with ``get(id_or_index) -> Problem`` and ``sample(np_random) -> Problem``."""


class TIRMathEnv(gymnasium.Env[str, str]):
    r"""Solve a math problem in turns, running Python in a sandbox between them.

    ## Description
    Tool-Integrated Reasoning (TIR): the model reads a problem, writes reasoning and a python code
    block, the block runs in a sandboxed Python kernel, its output comes back as the next
    observation, and so on until the model answers in ``\boxed{}``. Every turn gets its own
    reward, the signal that turn-level methods such as GTPO (arXiv 2511.14846) learn from.
    ``tir_envs.protocol`` holds the exact parsing rules.

    ## Action Space
    ``UnicodeText(max_action_chars)``: one assistant turn, any string. A turn with a python block is
    a *tool turn*; a turn without one is the *final turn*. Several blocks in one turn run as one
    cell (``code_blocks="all"``). A turn over ``max_action_chars`` is not parsed or run: it is
    rejected with a format penalty and the episode goes on. A non-``str`` action raises
    ``TypeError``.

    ## Observation Space
    ``UnicodeText(max_observation_chars)``. After ``reset``: the prompt (instructions + question;
    rendered with ``tokenizer``'s chat template when one is given). After a tool turn: the formatted
    output ```` ```output\n...\n```\n```` (stdout, then stderr, where the sandbox explains a
    timeout, a memory kill or a kernel restart, after which earlier variables are gone); the middle
    of overlong output is cut to ``max_output_chars``. After the final turn: ``""``. The gold answer
    never appears in an observation.

    ## Rewards
    Per turn, the sum of named components (``tir_envs.rewards.TurnReward``, all weights
    configurable): ``accuracy`` +1.0 on a final turn whose last ``\boxed{}`` is equivalent to the
    gold answer; ``format`` -0.1 on an invalid tool call (unclosed fence, empty code, code that does
    not parse, overlong turn) and -0.1 on a first turn that answers without calling the tool;
    ``execution`` 0 by default. A sandbox ``infra_error`` is never penalized.

    ## Starting State
    A problem drawn from the env's source with its ``np_random``, or pinned by
    ``reset(options={"problem_id": id})`` / ``{"problem_index": i}`` (how GRPO rolls out one problem
    G times). A fresh sandbox session (a stateful kernel) is opened at the episode's first tool
    call.

    ## Episode End
    - Termination: a final turn (no python block), graded.
    - Truncation: ``max_turns`` turns without a final one (also registered as
      ``max_episode_steps``).
    Stepping an ended episode raises ``gymnasium.error.ResetNeeded``. Its session is closed as soon
    as it ends, when ``reset`` starts another, and by ``close``.

    ## Information
    ``reset`` returns ``problem_id``, ``source``, ``turn`` (0) and ``messages`` (the prompt as chat
    messages). ``step`` returns:

    - ``turn`` (int, 1-based), ``problem_id`` (str)
    - ``tool_called`` (bool): the turn has a python block, valid or not
    - ``code`` (str): the code the turn asked to run, as written (``""`` if none)
    - ``exec``: ``{status, stdout, stderr, duration_s}``; status is ``ok | error | timeout | memory
      | output_limit | infra_error``, or ``not_run`` (no tool call, unclosed fence, empty code,
      overlong turn). Unparsable code is not sent to the sandbox and reports ``error`` with its
      ``SyntaxError``.
    - ``format_error`` (str | None): ``unclosed_fence | empty_code | syntax_error |
      action_too_long``
    - ``final_answer`` (str | None), ``correct`` (bool | None): set on the final turn only
    - ``grading`` (str | None): which grader layer decided (``tir_envs.grading.Verdict.method``); a
      ``timeout`` or ``worker_error`` there means "could not decide", not a wrong answer
    - ``reward_components`` (dict[str, float]): what ``reward`` is the sum of

    ## Arguments
    ```python
    import gymnasium, tir_envs
    env = gymnasium.make("TIR-Math-v0")                          # procedural, offline
    env = gymnasium.make("TIR-MATH500-v0", data_dir="data/")      # or TIR_DATA_DIR
    env = gymnasium.make("TIR-Math-v0", problems="my.jsonl", fields={"answer_field": "target"})
    ```
    - ``problems``: ``"procedural"`` (default), a benchmark name (``math500``, ``aime24``,
      ``amc23``, ``gsm8k``, ``svamp``), a path to a jsonl/parquet file, or a problem source object.
      Files are read at the first ``reset``, so making an env never fails on a missing file.
    - ``data_dir``: where benchmark files live (default ``$TIR_DATA_DIR``).
    - ``fields``: keyword arguments for ``tir_envs.data.load_file`` (``question_field``, ...).
    - ``kinds``: procedural problem kinds (default: all of ``tir_envs.procedural.KINDS``).
    - ``max_turns``: turns before truncation. Through ``gymnasium.make`` also pass
      ``max_episode_steps`` (its ``TimeLimit`` wrapper defaults to 4).
    - ``system_prompt``, ``user_template``, ``tokenizer``: the prompt (``tir_envs.protocol``).
    - ``code_blocks``: which python blocks of a turn run: ``"all"`` (concatenated), ``"first"``,
      ``"last"``.
    - ``display_last_expression``: print a cell's trailing expression like a notebook.
    - ``max_action_chars``, ``max_output_chars``, ``max_observation_chars``: caps on a turn, on a
      tool output and on any observation (a longer prompt is an error at ``reset``).
    - ``exec_timeout_s``: wall clock per cell (default: the sandbox's ``Limits.timeout_s``).
    - ``grade_timeout_s``: bound on answer checking.
    - ``reward_weights`` (``TurnReward`` fields) or ``reward_fn`` (any ``TurnOutcome -> dict``).
    - ``sandbox``: a shared ``Sandbox`` (the env then never closes it); otherwise the env makes its
      own on first use with ``make_sandbox(sandbox_backend, **sandbox_kwargs)``.
    - ``render_mode``: ``"ansi"`` renders the transcript so far.

    ## Version History
    - v0: initial version.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        problems: str | os.PathLike | ProblemSource = "procedural",
        *,
        data_dir: str | os.PathLike | None = None,
        fields: Mapping[str, str] | None = None,
        kinds: Sequence[str] | None = None,
        max_turns: int = DEFAULT_MAX_TURNS,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        user_template: str = DEFAULT_USER_TEMPLATE,
        tokenizer: Any = None,
        code_blocks: BlockSelection = "all",
        display_last_expression: bool = True,
        max_action_chars: int = 32_000,
        max_output_chars: int = 2_048,
        max_observation_chars: int = 65_536,
        exec_timeout_s: float | None = None,
        grade_timeout_s: float = 5.0,
        reward_weights: Mapping[str, float] | None = None,
        reward_fn: RewardFn | None = None,
        sandbox: Sandbox | None = None,
        sandbox_backend: str = "local",
        sandbox_kwargs: Mapping[str, Any] | None = None,
        render_mode: str | None = None,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if code_blocks not in ("all", "first", "last"):
            raise ValueError(f"code_blocks must be 'all', 'first' or 'last', got {code_blocks!r}")
        if max_observation_chars < max_output_chars + 1024:
            raise ValueError("max_observation_chars must leave room for max_output_chars + 1024")
        if reward_fn is not None and reward_weights is not None:
            raise ValueError(
                "pass reward_weights (for the default TurnReward) or reward_fn, not both"
            )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None")
        self.problems = problems
        self.data_dir = data_dir
        self.fields = dict(fields or {})
        self.kinds = kinds
        self.max_turns = max_turns
        self.system_prompt = system_prompt
        self.user_template = user_template
        self.tokenizer = tokenizer
        self.code_blocks = code_blocks
        self.display_last_expression = display_last_expression
        self.max_action_chars = max_action_chars
        self.max_output_chars = max_output_chars
        self.exec_timeout_s = exec_timeout_s
        self.grade_timeout_s = grade_timeout_s
        self.reward_fn: RewardFn = reward_fn or TurnReward(**(reward_weights or {}))
        self.render_mode = render_mode

        self.action_space = UnicodeText(max_action_chars)
        self.observation_space = UnicodeText(max_observation_chars)

        self._sandbox = sandbox
        self._owns_sandbox = sandbox is None
        self.sandbox_backend = sandbox_backend
        self.sandbox_kwargs = dict(sandbox_kwargs or {})
        self._source: ProblemSource | None = None
        self._session: Session | None = None
        self._problem: Problem | None = None
        self._turn = 0
        self._done = False
        self._transcript: list[str] = []

    # ------------------------------------------------------------------ problems

    @property
    def source(self) -> ProblemSource:
        """The problem source, loaded on first use so ``make`` works before any data exists."""
        if self._source is None:
            self._source = self._load_source()
        return self._source

    def _load_source(self) -> ProblemSource:
        spec = self.problems
        if hasattr(spec, "get") and hasattr(spec, "sample"):
            return spec
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            return data.ProblemSet(spec)
        if not isinstance(spec, (str, os.PathLike)):
            raise TypeError(
                "problems must be 'procedural', a benchmark name, a file path, a list of Problems "
                f"or an object with get() and sample(); got {type(spec).__name__}"
            )
        if spec == "procedural":
            return ProceduralProblems(self.kinds)
        path = Path(spec)
        if isinstance(spec, os.PathLike) or path.suffix or path.exists():
            return data.ProblemSet.from_file(path, **self.fields)
        return data.ProblemSet.from_benchmark(spec, data_dir=self.data_dir)

    # ------------------------------------------------------------------ gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        self._close_session()
        self._problem = None  # a reset that fails below leaves nothing to step
        options = dict(options or {})
        problem_id = options.pop("problem_id", None)
        problem_index = options.pop("problem_index", None)
        if options:
            raise ValueError(
                f"unknown reset options {sorted(options)}; expected 'problem_id' or 'problem_index'"
            )
        if problem_id is not None and problem_index is not None:
            raise ValueError("pass either problem_id or problem_index, not both")
        if problem_id is not None:
            problem = self.source.get(str(problem_id))
        elif problem_index is not None:
            problem = self.source.get(int(problem_index))
        else:
            problem = self.source.sample(self.np_random)

        self._problem = problem
        self._turn = 0
        self._done = False
        messages = build_messages(problem.question, self.system_prompt, self.user_template)
        obs = render_prompt(
            problem.question, self.tokenizer, self.system_prompt, self.user_template
        )
        if len(obs) > self.observation_space.max_length:
            raise ValueError(
                f"the prompt of {problem.id} has {len(obs)} characters, over "
                f"max_observation_chars={self.observation_space.max_length}"
            )
        self._transcript = [obs]
        info = {"problem_id": problem.id, "source": problem.source, "turn": 0, "messages": messages}
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if not isinstance(action, str):
            raise TypeError(
                f"action must be a str (one assistant turn of text), got {type(action).__name__}"
            )
        if self._problem is None:
            raise ResetNeeded("call reset() before step()")
        if self._done:
            raise ResetNeeded("the episode has ended (terminated or truncated); call reset()")
        self._turn += 1

        result: ExecResult | None = None
        final_answer: str | None = None
        correct: bool | None = None
        grade_method: str | None = None
        if len(action) > self.max_action_chars:
            tool_called, code, format_error, final = False, "", "action_too_long", False
            obs = format_rejection(
                f"this turn has {len(action)} characters, over the limit of {self.max_action_chars}"
            )
        else:
            parsed = parse_turn(action, self.code_blocks)
            tool_called, code, format_error = parsed.tool_call, parsed.code, parsed.format_error
            final = not parsed.tool_call
            if final:
                final_answer = parsed.final_answer
                verdict = grading.judge(
                    final_answer, self._problem.answer, timeout_s=self.grade_timeout_s
                )
                correct, grade_method = verdict.correct, verdict.method
                obs = ""
            elif format_error == "syntax_error":
                result = ExecResult(ExecStatus.ERROR, stderr=parsed.syntax_error or "")
                obs = format_output(result, self.max_output_chars)
            elif format_error is not None:
                obs = format_rejection(
                    "the code block is never closed with ```"
                    if format_error == "unclosed_fence"
                    else "the code block is empty"
                )
            else:
                result = self._run(code)
                obs = format_output(result, self.max_output_chars)

        outcome = TurnOutcome(
            problem=self._problem,
            action=action,
            turn=self._turn,
            tool_called=tool_called,
            format_error=format_error,
            exec_status=result.status.value if result else None,
            final=final,
            final_answer=final_answer,
            correct=correct,
        )
        components = {name: float(value) for name, value in self.reward_fn(outcome).items()}
        terminated = final
        truncated = not terminated and self._turn >= self.max_turns
        if terminated or truncated:
            self._done = True
            self._close_session()
        self._transcript += [action, obs]

        info = {
            "turn": self._turn,
            "problem_id": self._problem.id,
            "tool_called": tool_called,
            "code": code,
            "exec": result.to_dict() if result else _not_run(),
            "format_error": format_error,
            "final_answer": final_answer,
            "correct": correct,
            "grading": grade_method,
            "reward_components": components,
        }
        return obs, float(sum(components.values())), terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return "".join(self._transcript)
        return None

    def close(self) -> None:
        """Release the episode's session and, if the env made it, the sandbox; safe to repeat.

        The episode ends with it: ``step`` raises until the next ``reset``.
        """
        self._done = True
        self._close_session()
        if self._owns_sandbox and self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
        super().close()

    # ------------------------------------------------------------------ sandbox

    def _run(self, code: str) -> ExecResult:
        if self.display_last_expression:
            code = display_last_expression(code)
        try:
            if self._session is None:
                self._session = self._open_session()
            result = self._session.run(code, timeout=self.exec_timeout_s)
        except SandboxError as exc:
            logger.warning("sandbox failure (reported as infra_error): %s", exc)
            result = ExecResult(ExecStatus.INFRA_ERROR, stderr=f"SandboxError: {exc}\n")
        if result.status is ExecStatus.INFRA_ERROR:
            # The kernel's state can no longer be trusted; the next tool call gets a fresh one.
            self._close_session()
        return result

    def _open_session(self) -> Session:
        """A session from our sandbox; an owned sandbox that cannot give one is replaced once."""
        if self._sandbox is None:
            self._sandbox = make_sandbox(self.sandbox_backend, **self.sandbox_kwargs)
        try:
            return self._sandbox.session()
        except SandboxError as exc:
            if not self._owns_sandbox:
                raise
            logger.warning("replacing a sandbox that cannot open sessions: %s", exc)
            self._drop_owned_sandbox()
            self._sandbox = make_sandbox(self.sandbox_backend, **self.sandbox_kwargs)
            return self._sandbox.session()

    def _close_session(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            try:
                session.close()
            except SandboxError as exc:
                logger.warning("closing a sandbox session failed: %s", exc)

    def _drop_owned_sandbox(self) -> None:
        if self._owns_sandbox and self._sandbox is not None:
            sandbox, self._sandbox = self._sandbox, None
            try:
                sandbox.close()
            except SandboxError as exc:
                logger.warning("closing a broken sandbox failed: %s", exc)


def _not_run() -> dict[str, Any]:
    return {"status": "not_run", "stdout": "", "stderr": "", "duration_s": 0.0}
