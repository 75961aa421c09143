"""Problem sources: benchmark files, user files (jsonl/parquet, field maps), the hub, ProblemSet."""

from __future__ import annotations

import hashlib
import json
import sys
import types

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.real_records import REAL_RECORDS
from tir_envs.data import (
    BENCHMARKS,
    DATA_DIR_ENV,
    Problem,
    ProblemSet,
    benchmark_spec,
    canonical_number,
    detect_fields,
    load_benchmark,
    load_file,
    suspect_gold,
)
from tir_envs.grading import grade
from tir_envs.procedural import HELDOUT_SEEDS, TEST_KINDS, ProceduralProblems


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# The real benchmark files
# --------------------------------------------------------------------------------------------

EXPECTED = {
    # name: (count, first id, first answer, a substring of the first question)
    "math500": (
        500,
        "math500/test/precalculus/807.json",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "polar",
    ),
    "aime24": (30, "aime24/60", "204", "Aya goes for a $9$-kilometer-long walk"),
    "amc23": (40, "amc23/0", "27", "Alicia lives in $A$"),
    "gsm8k": (1319, "gsm8k/0", "18", "Janet"),
    "svamp": (1000, "svamp/chal-777", "145", "into 93 groups. How big is each group of bananas?"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_files_load(name, benchmarks_dir):
    problems = load_benchmark(name, benchmarks_dir)
    count, first_id, first_answer, question_part = EXPECTED[name]
    assert len(problems) == count
    assert problems[0].id == first_id and problems[0].answer == first_answer
    assert question_part in problems[0].question
    assert len({p.id for p in problems}) == count
    assert all(p.source == name and p.question.strip() and p.answer.strip() for p in problems)
    assert all(p.id.startswith(f"{name}/") for p in problems)


def test_benchmark_answers_are_reduced_for_grading(benchmarks_dir):
    by_id = {p.id: p for name in EXPECTED for p in load_benchmark(name, benchmarks_dir)}
    assert by_id["aime24/67"].answer == "25"  # file: "025"
    assert by_id["amc23/17"].answer == "-1"  # file: -1.0
    assert "2125" in {p.answer for p in by_id.values() if p.source == "gsm8k"}  # file: "#### 2,125"
    assert all(p.answer.lstrip("-").isdigit() for p in by_id.values() if p.source != "math500")
    assert by_id["math500/test/precalculus/807.json"].meta["subject"] == "Precalculus"
    assert by_id["svamp/chal-777"].meta["Equation"] == "( 290.0 / 2.0 )"


def test_gold_answers_never_leak_into_questions_via_meta(benchmarks_dir):
    problem = load_benchmark("gsm8k", benchmarks_dir)[0]
    assert "####" not in problem.question


def test_data_dir_from_environment(benchmarks_dir, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(benchmarks_dir))
    assert len(load_benchmark("AIME24")) == 30


def test_benchmark_name_spellings():
    assert benchmark_spec("MATH-500").name == "math500"
    assert benchmark_spec("aime_2024").name == "aime24"
    assert benchmark_spec("GSM8K").name == "gsm8k"
    with pytest.raises(KeyError, match="unknown benchmark .mmlu.; known: .*gsm8k"):
        benchmark_spec("mmlu")


def test_benchmark_parquet_round_trip(benchmarks_dir, tmp_path):
    problems = load_benchmark("math500", benchmarks_dir)
    records = [json.loads(line) for line in (benchmarks_dir / "math500.jsonl").open()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "math500.parquet")
    assert load_benchmark("math500", tmp_path, from_hub=False) == problems


# --------------------------------------------------------------------------------------------
# Missing data and the hub
# --------------------------------------------------------------------------------------------


def test_missing_benchmark_error_names_the_file_and_tir_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as error:
        load_benchmark("gsm8k", tmp_path, from_hub=False)
    message = str(error.value)
    assert "gsm8k.jsonl" in message and "gsm8k.parquet" in message and DATA_DIR_ENV in message
    with pytest.raises(FileNotFoundError, match=f"\\${DATA_DIR_ENV} is unset"):
        load_benchmark("gsm8k", from_hub=False)


def test_missing_benchmark_reports_why_the_hub_did_not_help(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the hub extra were not installed
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="datasets.*not installed") as error:
        load_benchmark("svamp", tmp_path)
    assert DATA_DIR_ENV in str(error.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="offline"):
        load_benchmark("svamp", tmp_path)
    with pytest.raises(ImportError, match="hub"):
        load_benchmark("svamp", tmp_path, from_hub=True)


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in ``datasets`` module: the hub code path without the network."""
    calls = []
    tables = {
        "openai/gsm8k": [
            {"question": "1+1?", "answer": "1+1=2\n#### 2"},
            {"question": "2*1,000?", "answer": "#### 2,000"},
        ],
        "math-ai/amc23": [{"id": 7, "problem": "Renamed column?", "answer": 3.0}],
    }

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return tables[path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    return calls


def test_hub_fallback_when_no_local_file(fake_hub, tmp_path):
    problems = load_benchmark("gsm8k", tmp_path)
    assert fake_hub == [("openai/gsm8k", "main", "test")]
    assert [(p.id, p.answer) for p in problems] == [("gsm8k/0", "2"), ("gsm8k/1", "2000")]


def test_hub_copy_with_renamed_columns_is_auto_detected(fake_hub, tmp_path):
    (problem,) = load_benchmark("amc23", tmp_path, from_hub=True)
    assert (problem.id, problem.question, problem.answer) == ("amc23/7", "Renamed column?", "3")


def test_local_file_wins_over_the_hub(fake_hub, tmp_path):
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "local?", "answer": "#### 5", "idx": 0}])
    assert load_benchmark("gsm8k", tmp_path)[0].question == "local?"
    assert fake_hub == []


# --------------------------------------------------------------------------------------------
# User files
# --------------------------------------------------------------------------------------------


def test_load_file_jsonl_autodetects_common_schema(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"problem": "What is 2+2?", "answer": "4", "id": "a", "level": 1},
            {"problem": "Half of 1?", "answer": "\\frac{1}{2}", "id": "b", "level": 2},
        ],
    )
    problems = load_file(path)
    assert problems[0] == Problem("file/a", "What is 2+2?", "4", "file", {"level": 1})
    assert problems[1].answer == "\\frac{1}{2}"


def test_load_file_parquet(tmp_path):
    table = pa.table({"question": ["Q1", "Q2"], "Answer": [5.0, 2.5]})
    pq.write_table(table, tmp_path / "mine.parquet")
    problems = load_file(tmp_path / "mine.parquet", source="custom")
    assert [(p.id, p.answer, p.source) for p in problems] == [
        ("custom/0", "5", "custom"),
        ("custom/1", "2.5", "custom"),
    ]


def test_load_file_answer_from_boxed_solution_and_hashes(tmp_path):
    path = write_jsonl(
        tmp_path / "sol.jsonl",
        [{"Question": "Q", "solution": "So it is $\\boxed{\\frac{3}{4}}$."}],
    )
    assert load_file(path)[0].answer == "\\frac{3}{4}"
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "Q", "answer": "work\n#### 1,234"}])
    assert load_file(path)[0].answer == "1234"


def test_load_file_svamp_style_body_and_question(tmp_path):
    path = write_jsonl(
        tmp_path / "svamp.jsonl",
        [{"Body": "Tom has 3 apples", "Question": "How many now?", "Answer": 3.0, "ID": "x"}],
    )
    (problem,) = load_file(path)
    assert problem.question == "Tom has 3 apples. How many now?" and problem.answer == "3"


def test_load_file_explicit_field_mapping(tmp_path):
    path = write_jsonl(
        tmp_path / "odd.jsonl",
        [{"stem": "A", "tail": "B?", "gold_value": 7, "key": "k1"}],
    )
    (problem,) = load_file(
        path, question_field="stem+tail", answer_field="gold_value", id_field="key", source="odd"
    )
    assert (problem.id, problem.question, problem.answer) == ("odd/k1", "A. B?", "7")
    assert problem.meta == {}
    (problem,) = load_file(path, question_field="key+stem+tail", answer_field="gold_value")
    assert problem.question == "k1. A. B?" and problem.id == "file/0"


def test_load_file_unknown_schema_lists_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "Q", "label": 1}])
    with pytest.raises(
        ValueError,
        match=r"question_field=.*\['text', 'label'\]|\['text', 'label'\].*question_field=",
    ):
        load_file(path)
    with pytest.raises(ValueError, match="'nope' not in the file's fields"):
        load_file(path, question_field="text", answer_field="nope")
    with pytest.raises(ValueError, match="id field 'nope'"):
        load_file(path, question_field="text", answer_field="label", id_field="nope")


def test_load_file_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_file(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="use .jsonl or .parquet"):
        load_file(tmp_path / "data.csv")
    (tmp_path / "broken.jsonl").write_text('{"question": "Q", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_file(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no problems"):
        load_file(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "dupes.jsonl", [{"question": "Q", "answer": 1, "id": 1}] * 2)
    with pytest.raises(ValueError, match="duplicate problem id 'file/1'"):
        load_file(tmp_path / "dupes.jsonl")
    write_jsonl(tmp_path / "nobox.jsonl", [{"question": "Q", "solution": "no final answer"}])
    with pytest.raises(ValueError, match="record 0.*no \\\\boxed"):
        load_file(tmp_path / "nobox.jsonl")
    write_jsonl(tmp_path / "blank.jsonl", [{"question": "Q", "answer": None}])
    with pytest.raises(ValueError, match="record 0.*empty 'answer'"):
        load_file(tmp_path / "blank.jsonl")
    write_jsonl(tmp_path / "ragged.jsonl", [{"question": "Q", "answer": 1}, {"question": "Q2"}])
    with pytest.raises(KeyError, match="record 1 has no field"):
        load_file(tmp_path / "ragged.jsonl")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5.0, "5"),
        (2.5, "2.5"),
        (7, "7"),
        ("033", "33"),
        ("2,125", "2125"),
        ("-4.0", "-4"),
        ("\\frac12", "\\frac12"),
    ],
)
def test_canonical_number(value, expected):
    assert canonical_number(value) == expected


# --------------------------------------------------------------------------------------------
# ProblemSet
# --------------------------------------------------------------------------------------------


@pytest.fixture
def problems():
    return ProblemSet(Problem(f"t/{i}", f"q{i}", str(i), "file") for i in range(10))


def test_problem_set_lookup(problems):
    assert len(problems) == 10 and problems[3].id == "t/3"
    assert problems.get("t/4") is problems[4]
    assert problems.get(4) is problems[4] and problems.get(np.int64(4)) is problems[4]
    assert problems.get(-1).id == "t/9"
    assert "t/2" in problems and "t/99" not in problems
    assert problems.index_of("t/7") == 7
    assert isinstance(problems[2:5], ProblemSet) and problems[2:5].ids == ["t/2", "t/3", "t/4"]
    with pytest.raises(KeyError, match="'t/99'.*ids look like"):
        problems.get("t/99")
    with pytest.raises(IndexError, match="out of range"):
        problems.get(10)
    with pytest.raises(TypeError):
        problems.get(1.5j)


def test_problem_set_sampling_is_seeded_and_covers_all(problems):
    def draws(seed):
        rng = np.random.default_rng(seed)
        return [problems.sample(rng).id for _ in range(20)]

    assert draws(3) == draws(3) != draws(4)
    rng = np.random.default_rng(0)
    assert {problems.sample(rng).id for _ in range(500)} == set(problems.ids)


def test_problem_set_rejects_empty_and_duplicates():
    with pytest.raises(ValueError, match="at least one"):
        ProblemSet([])
    with pytest.raises(ValueError, match="duplicate"):
        ProblemSet([Problem("x", "q", "1", "file")] * 2)


def test_problems_are_hashable_despite_meta():
    problem = Problem("x", "q", "1", "file", {"level": 1})
    assert {problem: 1}[Problem("x", "q", "1", "file", {"level": 1})] == 1


# --------------------------------------------------------------------------------------------
# Layouts: read right or refused (issue 13)
# --------------------------------------------------------------------------------------------


def test_every_benchmark_has_a_real_file_or_real_records():
    read = {name for name in BENCHMARKS.names() if BENCHMARKS.get(name).build is None}
    assert read == set(EXPECTED) | set(REAL_RECORDS)


def test_the_procedural_test_set_is_pinned_and_never_trained_on():
    """``TIR-Math-Test-v0``: the same 128 problems on every machine (a generator that drifts
    changes the digest), every kind in each block of 16, and seeds no training source draws."""
    problems = load_benchmark("tir_math_test")
    rows = [[p.id, p.question, p.answer] for p in problems]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == "c0742dcf0dfa26f8c7871572cd6df52b183e7f7c1dd519d79933bd471d355414"
    assert len({p.id for p in problems}) == len(problems) == 128
    for block in range(0, 128, 16):
        assert {p.meta["kind"] for p in problems[block : block + 16]} == set(TEST_KINDS)
    assert max(p.meta["seed"] for p in problems) < HELDOUT_SEEDS
    rng = np.random.default_rng(0)
    drawn = [ProceduralProblems().sample(rng) for _ in range(2000)]
    assert min(p.meta["seed"] for p in drawn) >= HELDOUT_SEEDS

    env = gym.make("TIR-Math-Test-v0")
    _, info = env.reset(seed=3)
    assert info["problem_id"] in {p.id for p in problems}
    env.close()


def test_body_and_question_are_joined_in_any_letter_case(tmp_path):
    """ASDiv's lowercase layout: the question alone has none of the numbers."""
    path = write_jsonl(tmp_path / "asdiv.jsonl", REAL_RECORDS["asdiv"])
    problem = next(p for p in load_file(path) if p.id == "file/223")
    assert problem.question.startswith("Next in their itinerary was the insectarium")
    assert problem.question.endswith("60 species of butterflies, 15 species of ants and 20 "
                                     "species of other insects. How many species of insects "
                                     "did Penny capture?")
    assert detect_fields(["BODY", "QUESTION", "ANSWER"]).question == ("BODY", "QUESTION")
    assert detect_fields(["Context", "Problem", "Final_Answer"]).question == ("Context", "Problem")


def test_annotated_answers_are_reduced_so_a_correct_box_grades_right(tmp_path):
    path = write_jsonl(tmp_path / "asdiv.jsonl", REAL_RECORDS["asdiv"] + [
        {"body": "Paul painted 9 pictures on Monday and 4 on Tuesday.",
         "question": "How many pictures did he paint total?", "answer": "13 (pictures)",
         "idx": 7},
        {"body": "b", "question": "q", "answer": "9 (apples); 3 (pears)", "idx": 8},
    ])
    answers = {p.id: p.answer for p in load_file(path)}
    assert answers == {"file/29": "Mrs. Hilt", "file/174": "5:45", "file/223": "95",
                       "file/0": "9", "file/7": "13", "file/8": "9, 3"}
    assert grade("13", answers["file/7"]) and grade("\\text{Mrs. Hilt}", answers["file/29"])
    assert grade("3, 9", answers["file/8"]) and not grade("9", answers["file/8"])


@pytest.mark.parametrize(
    ("final_answer", "right", "wrong"),
    [
        (["-3,0"], "0, -3", "-3"),
        (["1", "2"], "2, 1", "1"),
        (["$69$,$84$"], "84, 69", "69"),
        (["$(1,1), (3,2)$"], "(3,2), (1,1)", "(1,1)"),
    ],
)
def test_list_answers_are_joined_as_a_set_never_a_repr(tmp_path, final_answer, right, wrong):
    path = write_jsonl(tmp_path / "ob.jsonl",
                       [{"id": 1, "question": "Find all x.", "final_answer": final_answer}])
    (problem,) = load_file(path)
    assert "[" not in problem.answer and "'" not in problem.answer
    assert grade(right, problem.answer) and not grade(wrong, problem.answer)


@pytest.mark.parametrize(
    ("record", "candidates"),
    [
        ({"question": "What is 2+2?", "prompt": "Say hi", "answer": 4}, r"'question', 'prompt'"),
        ({"problem": "2+2?", "answer": 4, "target": 5}, r"'answer', 'target'"),
        ({"Question": "2+2?", "question": "3+3?", "answer": 4}, r"'Question', 'question'"),
        ({"body": "Tom has 2.", "context": "Ann has 3.", "question": "How many?", "answer": 2},
         r"'body', 'context'"),
    ],
)
def test_ambiguous_layouts_are_refused_naming_the_candidates(tmp_path, record, candidates):
    path = write_jsonl(tmp_path / "ambiguous.jsonl", [record])
    with pytest.raises(ValueError, match=rf"ambiguous layout: .*\[{candidates}\]"):
        load_file(path)


def test_candidates_holding_the_same_values_are_not_ambiguous(benchmarks_dir):
    """AMC23's file has both ``problem`` and ``question``, with the same text."""
    assert [p.answer for p in load_file(benchmarks_dir / "amc23.jsonl")][:2] == ["27", "36"]


def test_suspect_gold_answers_are_reported(tmp_path, caplog):
    assert "Python list repr" in suspect_gold("['-3,0']")
    assert "annotation" in suspect_gold("13 (pictures)")
    assert suspect_gold("-3,0") is None and suspect_gold("(1,2]") is None
    path = write_jsonl(tmp_path / "odd.jsonl", [{"q": "x?", "a": "['-3,0']"}, {"q": "y?", "a": 1}])
    with caplog.at_level("WARNING", logger="tir_envs.data"):
        load_file(path, question_field="q", answer_field="a")
    assert "1 of 2 gold answers" in caplog.text and "tir data check" in caplog.text


# --------------------------------------------------------------------------------------------
# The standard TIR set beyond the shared five, from a few real records each
# --------------------------------------------------------------------------------------------

REAL_EXPECTED = {
    # name: (ids, gold answers)
    "aime25": (["aime25/0", "aime25/3"], ["70", "117"]),
    "minerva_math": (["minerva_math/0", "minerva_math/1"], ["1.6", "4.5e33"]),
    "olympiadbench": (
        ["olympiadbench/1929", "olympiadbench/2243", "olympiadbench/2253", "olympiadbench/2317"],
        ["(1,1), (3,2)", "(-\\infty,-5)", "45", "-3,0"],
    ),
    "college_math": (
        ["college_math/0", "college_math/1", "college_math/2"],
        ["10-4 n", "(45,2),(-10,-9)", "x<-7:(-\\infty,-7)"],
    ),
    "asdiv": (["asdiv/29", "asdiv/174", "asdiv/223", "asdiv/0"], ["Mrs. Hilt", "5:45", "95", "9"]),
    "gsm_hard": (["gsm_hard/0", "gsm_hard/1", "gsm_hard/2"], ["-9867630", "3431580", "3244047.1"]),
}


@pytest.mark.parametrize("name", sorted(REAL_EXPECTED))
def test_added_benchmarks_load_from_the_qwen_layout(name, sample_benchmarks_dir):
    problems = load_benchmark(name, sample_benchmarks_dir, from_hub=False)
    ids, answers = REAL_EXPECTED[name]
    assert [p.id for p in problems] == ids and [p.answer for p in problems] == answers
    assert all(p.source == name and p.question.strip() for p in problems)
    assert all("None" not in p.question for p in problems)  # OlympiadBench's null context


@pytest.mark.parametrize(
    ("name", "problem_id", "right", "wrong"),
    [
        ("aime25", "aime25/0", "070", "71"),
        ("minerva_math", "minerva_math/0", "1.6 \\mathrm{~cm}", "16"),
        ("minerva_math", "minerva_math/1", "4.5 \\times 10^{33}", "4.5 \\times 10^{32}"),
        ("olympiadbench", "olympiadbench/2243", "(-\\infty, -5)", "(-\\infty, -5]"),
        ("olympiadbench", "olympiadbench/2317", "0,-3", "-3"),
        ("olympiadbench", "olympiadbench/1929", "(3,2),(1,1)", "(2,3),(1,1)"),
        ("olympiadbench", "olympiadbench/2253", "45 \\text{ minutes}", "30"),
        ("college_math", "college_math/0", "10 - 4n", "10 + 4n"),
        ("college_math", "college_math/1", "(-10,-9), (45,2)", "(45,2)"),
        ("asdiv", "asdiv/223", "95", "94"),
        ("asdiv", "asdiv/29", "\\text{Mrs. Hilt}", "\\text{Jacob}"),
        ("gsm_hard", "gsm_hard/0", "-9,867,630", "9867630"),
        ("gsm_hard", "gsm_hard/2", "3244047.1", "3244047"),
    ],
)
def test_added_benchmarks_grade_their_answer_types(
    name, problem_id, right, wrong, sample_benchmarks_dir
):
    """Intervals, units, multiple answers, LaTeX and big numbers, on real records."""
    problems = ProblemSet(load_benchmark(name, sample_benchmarks_dir, from_hub=False))
    gold = problems.get(problem_id).answer
    assert grade(right, gold), (right, gold)
    assert not grade(wrong, gold), (wrong, gold)


def test_added_benchmark_names_and_env_ids():
    assert benchmark_spec("GSM-Hard").name == "gsm_hard"
    assert benchmark_spec("Minerva-Math").name == "minerva_math"
    assert benchmark_spec("AIME2025").name == "aime25"
    assert benchmark_spec("CollegeMath").name == "college_math"
    assert benchmark_spec("olympiad").name == "olympiadbench"
    assert benchmark_spec("gsm_hard").env_id == "TIR-GSM-HARD-v0"
    assert benchmark_spec("olympiadbench").hub_config == "OE_TO_maths_en_COMP"
