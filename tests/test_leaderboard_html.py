"""The leaderboard's ``index.html`` as a reader sees it: opened from disk in headless Chromium.

A page that parses can still show a broken table, a plot that does not load or a script that
throws; only a browser tells. Chromium comes from the system (Debian's ``chromium``, which
``.ci/run`` installs) or, where its CDN is reachable, from ``playwright install chromium``.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from algos.evaluation.leaderboard import (
    Benchmark,
    LeaderboardConfig,
    ModelSpec,
    benchmark_envs,
    build_results,
)
from algos.evaluation.report import write_outputs
from tests.conftest import require
from tests.test_leaderboard import record

pytestmark = pytest.mark.browser

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "leaderboard"


@pytest.fixture(scope="module")
def browser():
    """Debian's ``chromium`` when on PATH (Playwright's own build is unreachable here), else
    whatever ``playwright install chromium`` put in Playwright's cache."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        require(False, "playwright is not installed: pip install -e '.[browser]'")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        except Error as exc:
            require(False, "no Chromium to drive: apt-get install chromium "
                           f"({exc.message.splitlines()[0]})")
        yield browser
        browser.close()


@contextmanager
def opened(browser, path: Path):
    """The page at ``path``; on leaving, asserts that nothing logged an error, threw or failed
    to load."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(f"console: {msg.text}"))
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on("requestfailed", lambda request: errors.append(f"not loaded: {request.url}"))
    try:
        page.goto(path.as_uri())
        yield page
        assert not errors, f"errors on {path.name}: {errors}"
    finally:
        page.close()


def _table(page):
    return page.locator("table").first


def _rows(page) -> list[list[str]]:
    return _table(page).locator("tbody tr").evaluate_all(
        "rows => rows.map(row => Array.from(row.cells, cell => cell.textContent))")


def _lead(text: str) -> float:
    return float(re.match(r"\s*(-?\d+(?:\.\d+)?)", text)[1])


def _sort_by(page, header: str) -> str:
    """Click a header; returns its ``aria-sort``."""
    th = _table(page).locator("thead th").filter(has_text=re.compile(f"^{re.escape(header)}$"))
    th.get_by_role("button").click()
    return th.get_attribute("aria-sort")


def _models(page) -> list[str]:
    return [row[0] for row in _rows(page)]


def check_table_and_plot(page, results: dict) -> None:
    """One row per model, one column per benchmark plus the averages, and a loaded plot."""
    header = _table(page).locator("thead th").all_inner_texts()
    assert header == ["Model", *results["benchmarks"], "Macro avg", "Micro avg"]
    rows = _rows(page)
    assert [row[0] for row in rows] == list(results["results"])
    assert all(len(row) == len(header) for row in rows)
    assert page.locator("img").evaluate("img => img.complete ? img.naturalWidth : 0") > 0


def check_sorts(page, header: str, key) -> None:
    """Two clicks on ``header``: the first order, then its reverse; whole rows move."""
    col = _table(page).locator("thead th").all_inner_texts().index(header)
    before = _rows(page)
    numeric = key is _lead  # numbers come highest first, text A first
    first, second = ("descending", "ascending") if numeric else ("ascending", "descending")
    for order in (first, second):
        assert _sort_by(page, header) == order
        # Python's sort keeps ties in their current order, as the page's (stable) sort does.
        assert _rows(page) == sorted(before, key=lambda row: key(row[col]),
                                     reverse=order == "descending")
        before = _rows(page)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[dict, Path]:
    """``write_outputs`` on made-up records: three models whose ranks differ per benchmark, and
    scores (100.0, 50.0, 12.5) that sort differently as numbers than as text."""
    correct = {"alpha": {"svamp": 4, "gsm8k": 1}, "beta": {"svamp": 1, "gsm8k": 6},
               "gamma": {"svamp": 8, "gsm8k": 3}}  # of 4 problems x 2 samples
    config = LeaderboardConfig(benchmarks=("svamp", "gsm8k"), samples=2)
    envs = benchmark_envs()
    benchmarks = [Benchmark(name, envs[name], [f"p{i}" for i in range(4)], 4, "0" * 64)
                  for name in config.benchmarks]
    records = {}
    for model, counts in correct.items():
        for bench in benchmarks:
            for slot in range(8):
                pid, sample = f"p{slot // 2}", slot % 2
                records[(model, bench.name, pid, sample)] = {
                    "model": model, "benchmark": bench.name,
                    **record(pid, sample, slot < counts[bench.name], turns=2, tool_calls=1)}
    protocol = json.loads((COMMITTED / "results.json").read_text())["protocol"]
    results = build_results(records, [ModelSpec(m, m) for m in correct], benchmarks, config,
                            protocol, title="browser test")
    return results, write_outputs(results, tmp_path_factory.mktemp("lb"))["html"]


def test_the_page_shows_the_table_and_plot_and_sorts_by_a_clicked_column(browser, rendered):
    results, page_file = rendered
    with opened(browser, page_file) as page:
        check_table_and_plot(page, results)
        assert _sort_by(page, "svamp") == "descending"  # best first
        assert _models(page) == ["gamma", "alpha", "beta"]
        assert _sort_by(page, "svamp") == "ascending"
        assert _models(page) == ["beta", "alpha", "gamma"]  # as text, 100.0 would come first
        assert _sort_by(page, "gsm8k") == "descending"
        assert _models(page) == ["beta", "gamma", "alpha"]
        assert _table(page).locator("thead th[aria-sort]").count() == 1  # only the sorted column
        check_sorts(page, "svamp", _lead)
        check_sorts(page, "Macro avg", _lead)
        check_sorts(page, "Model", str.casefold)


def test_the_committed_page_opens_clean_and_sorts(browser):
    results = json.loads((COMMITTED / "results.json").read_text())
    with opened(browser, COMMITTED / "index.html") as page:
        check_table_and_plot(page, results)
        check_sorts(page, next(iter(results["benchmarks"])), _lead)
        check_sorts(page, "Model", str.casefold)


def test_errors_on_the_page_are_caught(browser, tmp_path):
    """The clean-page checks above mean something only if a faulty page fails them."""
    faulty = tmp_path / "faulty.html"
    faulty.write_text('<script>console.error("logged"); missing();</script>'
                      '<img src="file:///no/such.png">')
    with pytest.raises(AssertionError) as caught, opened(browser, faulty):
        pass
    message = str(caught.value)
    assert "console: logged" in message and "missing is not defined" in message
    assert "not loaded: file:///no/such.png" in message
