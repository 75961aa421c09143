"""Leaderboard outputs: the results as Markdown, a PNG of pass@1 per benchmark and one
self-contained HTML page (tables and the plot inlined), from ``build_results``'s dict alone, so a
table can be re-rendered from a committed ``results.json`` without rerunning anything."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

_GLOSSARY = (
    "Answer rate: share of samples that ended with a final answer the grader could read (a "
    "\\boxed{} in a turn without code). Tool-call rate: share of samples with at least one "
    "python block. Code-error rate: share of tool calls whose code did not run cleanly (error, "
    "timeout, memory, output limit). Samples hit by a sandbox infra error are not scored."
)


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """``results.json``, ``leaderboard.md``, ``leaderboard.png`` and ``index.html``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_png(results)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "leaderboard.md",
        "png": out_dir / "leaderboard.png",
        "html": out_dir / "index.html",
    }
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(to_markdown(results))
    paths["png"].write_bytes(png)
    paths["html"].write_text(to_html(results, png))
    return paths


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell_text(cell: dict, k: int) -> str:
    text = _pct(cell["pass@1"])
    if cell.get("problems", 0) > 1 and "pass@1_se" in cell:
        text += f" ± {_pct(cell['pass@1_se'])}"
    if k > 1:
        text += f" / {_pct(cell['pass@k'])}"
    return text if cell.get("complete", True) else text + " (incomplete)"


def _rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The main table: pass@1 (and pass@k) per benchmark, then macro and micro averages."""
    benches = list(results["benchmarks"])
    header = ["Model", *benches, "Macro avg", "Micro avg"]
    rows = []
    for label, r in results["results"].items():
        cells = [*(r["benchmarks"][b] for b in benches), r["overall_macro"], r["overall_micro"]]
        rows.append([label, *(_cell_text(c, results["k"]) for c in cells)])
    return header, rows


def _detail_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Behaviour per model x benchmark: how often the tool is used and how it goes."""
    k = results["k"]
    header = ["Model", "Benchmark", "Problems", "Samples", "pass@1 %",
              *([f"pass@{k} %"] if k > 1 else []), "Mean turns", "Tokens/sample",
              "Answer rate", "Tool-call rate", "Code-error rate", "Infra errors"]
    rows = []
    for label, r in results["results"].items():
        named = [*r["benchmarks"].items(), ("overall (micro)", r["overall_micro"])]
        for bench, c in named:
            rows.append([label, bench, str(c["problems"]), str(c["samples"]), _pct(c["pass@1"]),
                         *([_pct(c["pass@k"])] if k > 1 else []), f"{c['mean_turns']:.2f}",
                         f"{c['mean_generated_tokens']:.0f}", f"{c['answer_rate']:.2f}",
                         f"{c['tool_call_rate']:.2f}",
                         f"{c['code_error_rate']:.2f}", str(c["infra_errors"])])
    return header, rows


def _protocol_lines(results: dict) -> list[str]:
    p, k = results["protocol"], results["k"]
    subsets = ", ".join(
        f"{name} {b['problems_evaluated']}/{b['problems_total']}"
        + (" (first by index)" if b["problems_evaluated"] < b["problems_total"] else "")
        for name, b in results["benchmarks"].items()
    )
    m = results["machine"]
    protocol = (
        f"Protocol: up to {p['max_turns']} turns of {p['max_new_tokens']} new tokens "
        f"({p['max_total_tokens']} per episode), temperature {p['temperature']}, "
        f"top-p {p['top_p']}, seed {p['seed']} (+ sample index), {k} sample(s) per problem; "
        f"grader {p['grader']}; {p['sandbox']} sandbox, {p['exec_timeout_s']} s per cell."
    )
    cells = "Cells: pass@1 % (mean over samples) ± its standard error over problems" + (
        f" / unbiased pass@{k} %." if k > 1 else "."
    )
    generated = (
        f"Generated {results['date']} on {m['cpu']} ({m['cpus']} CPUs), commit {m['commit']}"
        + ("." if results["complete"] else "; INCOMPLETE: some cells lack samples, rerun.")
    )
    return [protocol, f"Problems: {subsets}.", cells, generated]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def to_markdown(results: dict) -> str:
    lines = [f"# {results['title']}", "", *(f"{line}  " for line in _protocol_lines(results)), ""]
    lines += md_table(*_rows(results))
    lines += ["", "## Per benchmark", ""]
    lines += md_table(*_detail_rows(results))
    lines += ["", _GLOSSARY, ""]
    return "\n".join(lines)


def plot_png(results: dict) -> bytes:
    """Grouped bars: pass@1 per benchmark (and the macro average), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [*results["benchmarks"], "macro avg"]
    labels = list(results["results"])
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(benches) * max(1, len(labels)) ** 0.5), 4))
    x = np.arange(len(benches))
    for i, label in enumerate(labels):
        r = results["results"][label]
        cells = [*(r["benchmarks"][b] for b in results["benchmarks"]), r["overall_macro"]]
        values = [100 * c["pass@1"] for c in cells]
        errors = [100 * c.get("pass@1_se", 0.0) for c in cells]
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, values, width, yerr=errors,
                      capsize=2, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, benches)
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, max(5.0, ax.get_ylim()[1]))
    ax.set_title(results["title"])
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


# Sorts a table by the clicked header: on the cells' leading number when every cell of the column
# has one (``12.5 ± 3.1 / 20.0`` sorts on 12.5), else on the text. A first click puts the highest
# number (or A) on top, the next reverses; ``aria-sort`` tells screen readers the current order.
_SORT_SCRIPT = r"""
const lead = text => {
  const m = /^\s*(-?\d+(?:\.\d+)?)/.exec(text);
  return m ? parseFloat(m[1]) : NaN;
};
for (const table of document.querySelectorAll("table")) {
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach((th, col) => th.querySelector("button").addEventListener("click", () => {
    const body = table.tBodies[0], rows = Array.from(body.rows);
    const text = row => row.cells[col].textContent;
    const numeric = rows.every(row => !isNaN(lead(text(row))));
    const now = th.getAttribute("aria-sort");
    const order = now ? (now === "ascending" ? "descending" : "ascending")
                      : (numeric ? "descending" : "ascending");
    const sign = order === "ascending" ? 1 : -1;
    rows.sort((a, b) => sign * (numeric ? lead(text(a)) - lead(text(b))
                                        : text(a).localeCompare(text(b))));
    heads.forEach(h => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", order);
    body.append(...rows);
  }));
}
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    """Headers are buttons, so sorting works from the keyboard too."""
    head = "".join(
        f'<th scope="col"><button type="button">{html.escape(h)}</button></th>' for h in header
    )
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(results: dict, png: bytes) -> str:
    """One static page, no external resources: tables sortable by an inline script, the plot
    inlined as base64."""
    title = html.escape(results["title"])
    notes = "".join(f"<p>{html.escape(line)}</p>" for line in _protocol_lines(results))
    image = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
p {{ color: #444; font-size: 0.9em; }}
img {{ max-width: 100%; }}
th button {{ font: inherit; color: inherit; background: none; border: 0; padding: 0;
  cursor: pointer; text-align: inherit; }}
th[aria-sort=ascending] button::after {{ content: " \\25B2"; }}
th[aria-sort=descending] button::after {{ content: " \\25BC"; }}
</style></head><body>
<h1>{title}</h1>
{notes}
{_html_table(*_rows(results))}
<img alt="pass@1 per benchmark" src="data:image/png;base64,{image}">
<h2>Per benchmark</h2>
{_html_table(*_detail_rows(results))}
<p>{html.escape(_GLOSSARY)}</p>
<script>{_SORT_SCRIPT}</script>
</body></html>
"""
