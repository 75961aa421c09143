"""The leaderboard end to end on real benchmark files, the real env and local sandbox.

Models here are tiny: a freshly initialised tiny Llama (real generation), and a scripted
generator that plays a model with a known answer pattern, so the metrics that come out of the
whole pipeline can be checked against numbers worked out by hand.
"""

from __future__ import annotations

import base64
import html.parser
import json
import re
import runpy
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from math import comb
from pathlib import Path

import pytest
from typer.testing import CliRunner

from algos.cli import app
from algos.evaluation.leaderboard import (
    QWEN_TIR_SYSTEM_PROMPT,
    RECORDS_FILE,
    LeaderboardConfig,
    ModelSpec,
    SetupError,
    cell_metrics,
    files_sha256,
    load_records,
    parse_limit,
    record_key,
    resolve_benchmarks,
    run_leaderboard,
)
from algos.generation.base import Completion, Generator, SamplingParams
from algos.generation.hf import HFGenerator
from algos.tiny import save_tiny, tiny_model, tiny_tokenizer
from tir_envs.data import ProblemSet


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(0, tokenizer)


def record(pid, sample, correct, *, turns=1, tool_calls=0, code_errors=0, infra=False,
           answered=None):
    answered = correct if answered is None else answered
    return {"problem_id": pid, "sample": sample, "correct": correct, "turns": turns,
            "tool_calls": tool_calls, "code_errors": code_errors, "infra_error": infra,
            "reward": float(correct), "generated_tokens": 10 * turns,
            "final_answer": "42" if answered else None}


# ------------------------------------------------------------------------------ metrics math


def test_cell_metrics_on_known_records():
    # p0: 1 of 4 correct, p1: 4 of 4, p2: 0 of 4; k = 2.
    rows = [record("p0", s, s == 0) for s in range(4)]
    rows += [record("p1", s, True, turns=2, tool_calls=1, code_errors=s % 2) for s in range(4)]
    rows += [record("p2", s, False, turns=3, tool_calls=2, answered=s < 2) for s in range(4)]
    m = cell_metrics(rows, k=2)
    assert m["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3)
    p0_pass2 = 1 - comb(3, 2) / comb(4, 2)  # = 0.5: the unbiased estimator, not 1 - 0.75^2
    assert m["k"] == 2 and m["pass@k"] == pytest.approx((p0_pass2 + 1 + 0) / 3)
    assert m["mean_turns"] == pytest.approx(2.0) and m["mean_generated_tokens"] == 20
    assert m["tool_call_rate"] == pytest.approx(8 / 12)
    assert m["code_error_rate"] == pytest.approx(2 / 12)  # 2 failed runs out of 12 tool calls
    assert m["answer_rate"] == pytest.approx(7 / 12)  # 5 correct + 2 wrong answers; 5 gave none
    per_problem = [0.25, 1.0, 0.0]
    mean = sum(per_problem) / 3
    se = (sum((x - mean) ** 2 for x in per_problem) / 2) ** 0.5 / 3**0.5
    assert m["pass@1_se"] == pytest.approx(se)


def test_infra_errors_are_not_scored_and_k_never_exceeds_scored_samples():
    rows = [record("p0", 0, True), record("p0", 1, False, infra=True),
            record("p1", 0, False), record("p1", 1, True)]
    m = cell_metrics(rows, k=2)
    assert m["infra_errors"] == 1 and m["samples"] == 3
    assert m["k"] == 1 and m["pass@k"] == m["pass@1"] == pytest.approx(0.75)


def test_names_and_limits_parse_with_clear_errors():
    assert resolve_benchmarks("GSM8K, MATH-500,aime2024,gsm8k") == ("gsm8k", "math500", "aime24")
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'.*gsm8k"):
        resolve_benchmarks("gsm8k,mmlu")
    assert parse_limit("5") == 5 and parse_limit(None) is None
    assert parse_limit("gsm8k=20,MATH-500=3") == {"gsm8k": 20, "math500": 3}
    for bad in ("0", "x", "gsm8k=0", "nope=3"):
        with pytest.raises(ValueError):
            parse_limit(bad)
    assert ModelSpec.parse("gtpo=runs/gtpo/final") == ModelSpec("gtpo", "runs/gtpo/final")
    assert ModelSpec.parse("HuggingFaceTB/SmolLM2-135M-Instruct").label == "SmolLM2-135M-Instruct"


# ------------------------------------------------------------------------------ a scripted model


class ScriptedModel(Generator):
    """Plays a model whose k-th problem (by index in its benchmark) is right in its first k
    samples: turn 1 runs code (it fails on odd problems), turn 2 boxes an answer."""

    def __init__(self, tokenizer, problems: dict[str, tuple[int, str]], seed: int = 0):
        self.tokenizer, self.problems, self.seed = tokenizer, problems, seed

    def generate(self, prompts, params: SamplingParams):
        return [self._turn(self.tokenizer.decode(p), params.seed - self.seed) for p in prompts]

    def _turn(self, context: str, sample: int) -> Completion:
        index, answer = next(v for q, v in self.problems.items() if q in context)
        if "```output" not in context.rsplit("<|im_start|>assistant", 1)[-1]:
            text = "Let me check.\n```python\n" + ("1/0" if index % 2 else f"print({answer!r})")
            text += "\n```\n"
        else:
            text = f"The answer is \\boxed{{{answer if sample < index else 'no idea'}}}."
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Completion(ids, [0.0] * len(ids), text, "stop")


@pytest.fixture(scope="module")
def scripted_run(benchmarks_dir, tokenizer, tmp_path_factory):
    """Two benchmarks x 4 problems x 3 samples through the real env and sandbox."""
    problems = {}
    for name in ("svamp", "gsm8k"):
        for i, p in enumerate(ProblemSet.from_benchmark(name, data_dir=benchmarks_dir)[:4]):
            problems[p.question] = (i, p.answer)
    config = LeaderboardConfig(benchmarks=("svamp", "gsm8k"), limit=4, samples=3,
                               temperature=1.0, max_turns=2, max_new_tokens=64, batch=4,
                               data_dir=str(benchmarks_dir))
    out = tmp_path_factory.mktemp("scripted")
    results = run_leaderboard(
        [ModelSpec("scripted", "scripted")], config, out,
        load=lambda spec: (ScriptedModel(tokenizer, problems), tokenizer),
    )
    return results, out


def test_metrics_through_the_whole_pipeline(scripted_run):
    results, _ = scripted_run
    r = results["results"]["scripted"]
    for name in ("svamp", "gsm8k"):
        cell = r["benchmarks"][name]
        # problem k is right in k of 3 samples (k = 0..3): pass@1 = (0 + 1/3 + 2/3 + 1) / 4
        assert cell["pass@1"] == pytest.approx(0.5)
        assert cell["k"] == 3 and cell["pass@k"] == pytest.approx(0.75)
        assert cell["mean_turns"] == 2 and cell["tool_call_rate"] == 1
        assert cell["code_error_rate"] == pytest.approx(0.5)
        assert cell["samples"] == cell["expected_samples"] == 12 and cell["complete"]
    assert r["overall_micro"]["problems"] == 8
    assert r["overall_micro"]["pass@1"] == pytest.approx(0.5)
    assert r["overall_macro"]["pass@k"] == pytest.approx(0.75)
    protocol = results["protocol"]
    assert protocol["max_turns"] == 2 and protocol["temperature"] == 1.0
    assert "math-verify" in protocol["grader"] and "\\boxed" in protocol["system_prompt"]
    assert results["benchmarks"]["gsm8k"]["problems_evaluated"] == 4
    assert results["benchmarks"]["gsm8k"]["problems_total"] == 1319


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.img = ""
        self.fetched: list[str] = []  # what a browser would load besides the page and its image

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img":
            self.img = dict(attrs)["src"]
        else:
            self.fetched += [value for name, value in attrs if name in ("src", "href")]


def test_outputs_are_written_and_parseable(scripted_run):
    import matplotlib.image

    results, out = scripted_run
    assert json.loads((out / "results.json").read_text()) == results
    assert results["machine"]["cpus"] and results["date"] and results["sessions"]
    md = (out / "leaderboard.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| scripted |")]
    assert table[0].split(" | ")[1:3] == ["50.0 ± 21.5 / 75.0", "50.0 ± 21.5 / 75.0"]
    assert "| Model | svamp | gsm8k | Macro avg | Micro avg |" in md
    png = (out / "leaderboard.png").read_bytes()
    assert png.startswith(b"\x89PNG") and matplotlib.image.imread(out / "leaderboard.png").ndim == 3
    page = _Tags()
    page.feed((out / "index.html").read_text())
    assert page.tags["table"] == 2 and page.tags["img"] == 1
    assert page.fetched == [] and page.tags["script"] == 1  # self-contained: one inline script
    assert base64.b64decode(page.img.removeprefix("data:image/png;base64,")) == png


def test_unchanged_rerun_evaluates_nothing(scripted_run, benchmarks_dir):
    results, out = scripted_run
    config = LeaderboardConfig(benchmarks=("svamp", "gsm8k"), limit=4, samples=3, temperature=1.0,
                               max_turns=2, max_new_tokens=64, batch=4,
                               data_dir=str(benchmarks_dir))
    again = run_leaderboard([ModelSpec("scripted", "scripted")], config, out, load=_no_model)
    assert again["results"] == results["results"]
    assert again["sessions"][-1]["samples_evaluated"] == 0


def _no_model(spec):
    raise AssertionError("nothing should need a model")


# ------------------------------------------------------------------------------ resume


class CrashAfterFirstChunk(Generator):
    """A real generator that dies once, on its first call after a chunk reached the records."""

    def __init__(self, inner: Generator, records):
        self.inner, self.records, self.crashed = inner, records, False

    def generate(self, prompts, params):
        if not self.crashed and self.records.is_file() and self.records.read_text().strip():
            self.crashed = True
            raise RuntimeError("generator died mid-evaluation")
        return self.inner.generate(prompts, params)


def _tiny_config(benchmarks_dir, **overrides):
    kwargs = {"benchmarks": ("svamp",), "limit": 4, "samples": 2, "temperature": 1.0,
              "max_turns": 2, "max_new_tokens": 12, "batch": 2, "data_dir": str(benchmarks_dir)}
    return LeaderboardConfig(**{**kwargs, **overrides})


def _lines(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(benchmarks_dir, model, tokenizer, tmp_path_factory):
    """The tiny model's uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    run_leaderboard([ModelSpec("tiny", "tiny")], _tiny_config(benchmarks_dir), out,
                    load=lambda spec: (HFGenerator(model, tokenizer), tokenizer))
    return out


def test_a_crashed_run_resumes_without_losing_or_repeating_samples(
    benchmarks_dir, model, tokenizer, reference, tmp_path
):
    records = tmp_path / RECORDS_FILE
    crashing = CrashAfterFirstChunk(HFGenerator(model, tokenizer), records)
    with pytest.raises(RuntimeError, match="died"):
        run_leaderboard([ModelSpec("tiny", "tiny")], _tiny_config(benchmarks_dir), tmp_path,
                        load=lambda spec: (crashing, tokenizer))
    assert len(_lines(records)) == 2  # the first chunk (batch 2) was kept
    assert not (tmp_path / "results.json").exists()

    results = run_leaderboard([ModelSpec("tiny", "tiny")], _tiny_config(benchmarks_dir), tmp_path,
                              load=lambda spec: (HFGenerator(model, tokenizer), tokenizer))
    lines = _lines(records)
    assert len(lines) == 8 == len({record_key(json.loads(x)) for x in lines})
    assert results["sessions"][-1]["samples_evaluated"] == 6
    assert results["results"]["tiny"]["benchmarks"]["svamp"]["samples"] == 8
    # Same chunks, same seeds: the resumed run made exactly the samples of the uninterrupted one.
    assert load_records(records) == load_records(reference / RECORDS_FILE)


def test_duplicates_and_a_torn_line_are_tolerated(benchmarks_dir, model, tokenizer, reference,
                                                  tmp_path):
    shutil.copy(reference / "run.json", tmp_path / "run.json")
    lines = _lines(reference / RECORDS_FILE)
    torn = lines[-1][: len(lines[-1]) // 2]  # a crash while writing the last record
    (tmp_path / RECORDS_FILE).write_text("\n".join(lines[:-1] + lines[:3]) + "\n" + torn)
    assert len(load_records(tmp_path / RECORDS_FILE)) == 7

    results = run_leaderboard([ModelSpec("tiny", "tiny")], _tiny_config(benchmarks_dir), tmp_path,
                              load=lambda spec: (HFGenerator(model, tokenizer), tokenizer))
    assert results["sessions"][-1]["samples_evaluated"] == 1  # only the torn record's key
    cell = results["results"]["tiny"]["benchmarks"]["svamp"]
    assert cell["samples"] == 8 and cell["complete"]
    text = (tmp_path / RECORDS_FILE).read_text()
    assert text.endswith("\n") and f"{torn}\n" in text  # the fragment did not swallow a record
    assert set(load_records(tmp_path / RECORDS_FILE)) == set(load_records(reference / RECORDS_FILE))


def test_more_samples_and_problems_extend_a_run(benchmarks_dir, model, tokenizer, reference,
                                                tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    results = run_leaderboard(
        [ModelSpec("tiny", "tiny")], _tiny_config(benchmarks_dir, limit=5, samples=3), tmp_path,
        load=lambda spec: (HFGenerator(model, tokenizer), tokenizer),
    )
    assert results["sessions"][-1]["samples_evaluated"] == 5 * 3 - 4 * 2
    assert results["results"]["tiny"]["benchmarks"]["svamp"]["k"] == 3


@pytest.mark.parametrize("change, message", [
    ({"max_new_tokens": 13}, "another protocol (differs in max_new_tokens"),
    ({"temperature": 0.5}, "differs in temperature"),
])
def test_a_rerun_under_another_protocol_is_refused(benchmarks_dir, reference, tmp_path, change,
                                                   message):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    with pytest.raises(SetupError, match=re.escape(message)):
        run_leaderboard([ModelSpec("tiny", "tiny")], _tiny_config(benchmarks_dir, **change),
                        tmp_path, load=_no_model)


def test_a_label_cannot_change_its_model(benchmarks_dir, reference, tmp_path):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    with pytest.raises(SetupError, match="label 'tiny'.*another label"):
        run_leaderboard([ModelSpec("tiny", "other/model")], _tiny_config(benchmarks_dir),
                        tmp_path, load=_no_model)


def test_a_checkpoint_retrained_at_the_same_path_is_refused(benchmarks_dir, tmp_path, caplog):
    """A local model is pinned by its files' hash: the same files resume, a run.json from before
    hashes learns it, and new weights at the old path need another label."""
    model_dir = save_tiny(tmp_path / "ckpt")
    config, out = _tiny_config(benchmarks_dir, limit=1, samples=1), tmp_path / "lb"
    first = run_leaderboard([ModelSpec.parse(f"ckpt={model_dir}")], config, out)
    assert first["models"]["ckpt"]["files_sha256"] == files_sha256(model_dir)

    state = json.loads((out / "run.json").read_text())
    del state["models"]["ckpt"]["files_sha256"]
    (out / "run.json").write_text(json.dumps(state))
    again = run_leaderboard([ModelSpec.parse(f"ckpt={model_dir}")], config, out, load=_no_model)
    assert again["sessions"][-1]["samples_evaluated"] == 0
    assert "predates model hashes" in caplog.text
    assert json.loads((out / "run.json").read_text())["models"]["ckpt"] == first["models"]["ckpt"]

    save_tiny(model_dir, seed=1)
    records = (out / RECORDS_FILE).read_text()
    with pytest.raises(SetupError, match="label 'ckpt'.*another label"):
        run_leaderboard([ModelSpec.parse(f"ckpt={model_dir}")], config, out, load=_no_model)
    assert (out / RECORDS_FILE).read_text() == records


# ------------------------------------------------------------------------------ presets, merging


def test_a_named_protocol_is_applied_and_recorded(benchmarks_dir, tmp_path):
    config = LeaderboardConfig.from_preset("qwen25-math-tir", benchmarks=("svamp",))
    assert (config.samples, config.temperature, config.max_turns, config.max_new_tokens) == (
        1, 0.0, 4, 2048)
    assert config.preset == "qwen25-math-tir"
    protocol = config.protocol()
    assert protocol["preset"] == "qwen25-math-tir"
    assert protocol["system_prompt"] == QWEN_TIR_SYSTEM_PROMPT
    changed = LeaderboardConfig.from_preset("qwen25-math-tir", max_new_tokens=256, batch=4)
    assert changed.preset == "qwen25-math-tir, modified: max_new_tokens"  # batch is not protocol
    with pytest.raises(ValueError, match="unknown protocol preset 'qwen'"):
        LeaderboardConfig.from_preset("qwen")
    # The CLI takes the name, and options on top of it are named as modifications.
    result = CliRunner().invoke(app, [
        "leaderboard", "--model", f"tiny={save_tiny(tmp_path / 'tiny')}", "--benchmarks",
        "svamp", "--limit", "1", "--protocol", "qwen25-math-tir", "--max-new-tokens", "8",
        "--data-dir", str(benchmarks_dir), "--out", str(tmp_path / "lb"),
    ])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "lb" / "results.json").read_text())
    assert results["protocol"]["preset"] == "qwen25-math-tir, modified: max_new_tokens"
    assert results["protocol"]["temperature"] == 0.0 and results["protocol"]["max_turns"] == 4


def test_runs_from_several_machines_merge_into_one_table(benchmarks_dir, model, tokenizer,
                                                         reference, tmp_path):
    """A second machine evaluates another model (and a sample the first one has too) into its
    own directory; merging adds its model and new records, keeps what was there, and counts
    nothing twice when repeated. A directory made under another protocol is refused."""
    other = tmp_path / "gpu-box"
    run_leaderboard([ModelSpec("tiny", "tiny"), ModelSpec("other", "other")],
                    _tiny_config(benchmarks_dir, limit=1), other,
                    load=lambda spec: (HFGenerator(model, tokenizer), tokenizer))
    here = tmp_path / "here"
    shutil.copytree(reference, here)
    before = load_records(here / RECORDS_FILE)
    for _ in range(2):
        results = run_leaderboard([ModelSpec("tiny", "tiny")], _tiny_config(benchmarks_dir),
                                  here, load=_no_model, merge=[other])
        merged = load_records(here / RECORDS_FILE)
        assert len(_lines(here / RECORDS_FILE)) == len(merged) == len(before) + 2
    assert {k: v for k, v in merged.items() if k[0] == "tiny"} == before
    assert list(results["models"]) == ["tiny", "other"]
    cell = results["results"]["other"]["benchmarks"]["svamp"]
    assert cell["samples"] == 2 and not cell["complete"]  # 1 of the 4 problems was run there
    assert len(results["sessions"]) == len(_read_lines_json(other / "sessions.jsonl")) + 3

    stranger = tmp_path / "stranger"
    run_leaderboard([ModelSpec("x", "x")], _tiny_config(benchmarks_dir, limit=1,
                                                        max_new_tokens=5), stranger,
                    load=lambda spec: (HFGenerator(model, tokenizer), tokenizer))
    with pytest.raises(SetupError, match="stranger holds samples made under another protocol"):
        run_leaderboard([ModelSpec("tiny", "tiny")], _tiny_config(benchmarks_dir), here,
                        load=_no_model, merge=[stranger])


def _read_lines_json(path):
    return [json.loads(line) for line in _lines(path)]


# ------------------------------------------------------------------------------ endpoint + CLI


def _serve(model, tokenizer):
    """A loopback OpenAI-compatible server backed by the tiny model, as vLLM would answer."""
    generator = HFGenerator(model, tokenizer)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            params = SamplingParams(max_new_tokens=body["max_tokens"],
                                    temperature=body["temperature"], top_p=body["top_p"],
                                    stop=tuple(body.get("stop", ())), seed=body.get("seed"))
            prompts = body["prompt"]  # like vLLM: one prompt's token ids, or a list of them
            if prompts and isinstance(prompts[0], int):
                prompts = [prompts]
            choices = []
            for i, c in enumerate(generator.generate(prompts, params)):
                choices.append({
                    "index": i, "text": c.text,
                    "finish_reason": "length" if c.finish_reason == "length" else "stop",
                    "stop_reason": params.stop[0] if c.finish_reason == "stop" else None,
                    "logprobs": {"tokens": [f"token_id:{t}" for t in c.token_ids],
                                 "token_logprobs": c.logprobs},
                })
            payload = json.dumps({"choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_cli_local_model_and_endpoint_agree(benchmarks_dir, model, tokenizer, tmp_path):
    model_dir = save_tiny(tmp_path / "tiny")  # the same weights as ``model`` (seed 0)
    server = _serve(model, tokenizer)
    try:
        result = CliRunner().invoke(app, [
            "leaderboard", "--model", f"local={model_dir}",
            "--endpoint", f"http://127.0.0.1:{server.server_port}/v1",
            "--endpoint-model", "served", "--endpoint-tokenizer", str(model_dir),
            "--benchmarks", "svamp", "--limit", "2", "--max-turns", "2",
            "--max-new-tokens", "12", "--data-dir", str(benchmarks_dir),
            "--out", str(tmp_path / "lb"),
        ])
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.output
    assert "| local |" in result.output and "| served |" in result.output
    results = json.loads((tmp_path / "lb" / "results.json").read_text())
    assert results["models"]["served"]["endpoint"].endswith("/v1")
    rows = load_records(tmp_path / "lb" / RECORDS_FILE)
    by_model = {m: {k[2:]: {f: v[f] for f in ("correct", "final_answer", "generated_tokens")}
                    for k, v in rows.items() if k[0] == m} for m in ("local", "served")}
    assert len(by_model["local"]) == 2 and by_model["local"] == by_model["served"]


@pytest.mark.parametrize("args, message", [
    (["--benchmarks", "gsm8k,mmlu"], "unknown benchmark 'mmlu'"),
    (["--data-dir", "/no/such/dir"], "data dir /no/such/dir does not exist"),
    (["--limit", "0"], "limit must be a positive integer"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--endpoint", "http://127.0.0.1:9/v1"], "--endpoint and --endpoint-model go together"),
])
def test_bad_input_is_refused_before_any_work(args, message, benchmarks_dir, tmp_path):
    base = ["leaderboard", "--benchmarks", "svamp", "--data-dir", str(benchmarks_dir),
            "--out", str(tmp_path / "lb")]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "lb" / RECORDS_FILE).exists()


def test_a_data_dir_without_the_benchmark_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SetupError, match=r"benchmark 'amc23' not found.*amc23\.jsonl"):
        run_leaderboard([ModelSpec("m", "m")],
                        LeaderboardConfig(benchmarks=("amc23",), data_dir=str(tmp_path)),
                        tmp_path / "lb", load=_no_model)


def test_the_benchmark_script_runs_a_checkpoint_into_its_out_dir(benchmarks_dir, tmp_path):
    script = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "run_leaderboard.py"))
    model_dir = save_tiny(tmp_path / "tiny")
    results = script["main"]([f"tiny={model_dir}", "--no-default-model", "--smoke",
                              "--benchmarks", "svamp", "--limit", "1",
                              "--data-dir", str(benchmarks_dir), "--out", str(tmp_path / "lb")])
    assert "smoke" in results["title"] and list(results["models"]) == ["tiny"]
    assert results["benchmarks"]["svamp"]["problems_evaluated"] == 1
    assert (tmp_path / "lb" / "index.html").is_file()
