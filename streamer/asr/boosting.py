"""Phrase boosting ("hotwords") for greedy decoding: a token prefix tree whose bonus is added to the scores of
the tokens that continue a listed phrase, the way NeMo's GPU-PB does it.

What we follow (facts, not code, from these sources; every line here is our own):

- NeMo's documentation, "Word Boosting / GPU-PB" (``asr/asr_customization/word_boosting``): GPU-PB is shallow
  fusion at decoding time, no retraining; the model's scores are rescaled at the token level with a boosting
  tree built from the user's phrase list; ``context_score`` 1.0 and ``depth_scaling`` 2.0 are the recommended
  values for CTC, RNN-T and TDT, and ``boosting_tree_alpha`` weighs the tree in the fusion ("tune it"). NeMo
  also boosts per stream (different phrases for each stream of a batch) in greedy label-looping decoding.
- The paper: A. Andrusenko, V. Bataev, L. Grigoryan, V. Lavrukhin, B. Ginsburg, "TurboBias: Universal ASR
  Context-Biasing powered by GPU-accelerated Phrase-Boosting Tree", arXiv:2508.07014 (2025).
- NeMo's ``ContextGraph`` (``parts/context_biasing/context_graph_universal.py``, itself from icefall) and
  ``GPUBoostingTreeModel`` (``boosting_graph_batched.py``), read for the exact rules:

  * The tree is a trie of each phrase's tokens with Aho-Corasick failure links (the longest proper suffix of
    a node's path that is also a path from the root).
  * A phrase's token at depth ``d`` (0 for its first token) is worth ``context_score`` when ``d == 0`` and
    ``context_score * depth_scaling + ln(d + 1)`` after that; a node's score is the sum along its path.
  * Scoring a token ``v`` in node ``n``: if ``n`` has a child for ``v``, the bonus is that child's token score
    and the child is the next node. Otherwise the decoder *backs off* to ``fail(n)`` paying
    ``score(fail(n)) - score(n)`` (negative: an unfinished match loses the bonus it accumulated beyond what its
    suffix still matches) and tries again there. A node that ends a phrase backs off for free: a completed
    phrase keeps its bonus. The root has an arc for every token: phrase starts earn their bonus, every other
    token 0 (``unk_score``).
  * Greedy decoding (RNNT/TDT label looping, CTC ``greedy_batch``) adds ``alpha`` times these bonuses to the
    non-blank tokens' scores but keeps the model's own blank / non-blank decision (and, for CTC, a repeat of
    the last label): the bonus only decides *which* token is emitted, never *whether* one is. Only an emitted
    token moves the tree's state.

Here ``alpha`` is the session's ``weight``; ``context_score`` and ``depth_scaling`` are fixed at NeMo's
recommendation. The bonus a phrase of k tokens can earn is ``weight * (1 + sum_{d=1}^{k-1} (2 + ln(d + 1)))``:
for weight 1, 1.0 for its first token, 2.69 for its second, 3.10 for its third, ... in log-probability units.

Compiled form: the back-off walk is done once per node when the tree is built, so a decoder step needs no
loop: for node ``q`` the tokens with an outcome of their own are listed (``tokens[q]``, ``scores[q]``,
``targets[q]``: at most the children along ``q``'s failure chain), and every other token costs ``fallback[q]``
(the whole chain back to the root) and leads to the root.

Shape legend:
    B streams in the batch   R rows picked from it   Q tree nodes   K listed tokens per node (padded)
    V vocab incl. blank (the tree covers the V - 1 tokens)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CONTEXT_SCORE = 1.0  # NeMo BoostingTreeModelConfig.context_score (recommended 1.0)
DEPTH_SCALING = 2.0  # NeMo BoostingTreeModelConfig.depth_scaling (recommended 2.0 for CTC, RNN-T and TDT)
ROOT = 0


def token_score(depth: int) -> float:
    """The unweighted bonus of a phrase's token at ``depth`` (0: its first token), as NeMo's ContextGraph gives it."""
    return CONTEXT_SCORE if depth == 0 else CONTEXT_SCORE * DEPTH_SCALING + math.log(depth + 1)


@dataclass(frozen=True, eq=False)
class PhraseTree:
    """One session's compiled boosting tree (immutable; shared by reference, never copied per step).

    Node ``0`` is the root. Padding entries of ``tokens`` hold ``vocab_size`` (a token that does not exist).
    """

    weight: float  # NeMo's boosting_tree_alpha: multiplies every bonus below (already applied)
    vocab_size: int  # tokens the tree covers (V - 1: the blank is never boosted)
    tokens: Tensor  # (Q, K) int64 tokens with an outcome of their own in each node
    scores: Tensor  # (Q, K) float32 weighted bonus of emitting ``tokens[q, k]`` in node q (may be negative)
    targets: Tensor  # (Q, K) int64 the node it leads to
    fallback: Tensor  # (Q,) float32 weighted bonus of any other token (back to the root; <= 0)

    @property
    def num_nodes(self) -> int:
        return int(self.fallback.shape[0])

    @classmethod
    def build(cls, phrases: Sequence[Sequence[int]], vocab_size: int, weight: float) -> PhraseTree:
        """Compile the tree of ``phrases`` (token id sequences, each non-empty, ids in ``[0, vocab_size)``).

        Duplicate phrases and shared prefixes share nodes (all phrases have the same per-token scores).
        """
        trie = _Trie()
        for ids in phrases:
            if not ids or not all(0 <= t < vocab_size for t in ids):
                raise ValueError(f"a phrase must be 1 or more token ids in [0, {vocab_size}), got {list(ids)}")
            trie.add(ids)
        fail = trie.failure_links()
        rows = [trie.outcomes(q, fail) for q in range(len(trie.children))]
        width = max(1, max(len(entries) for entries, _ in rows))
        padding = [(vocab_size, 0.0, ROOT)]
        table = [entries + padding * (width - len(entries)) for entries, _ in rows]  # Q lists of K entries
        tokens = torch.tensor([[token for token, _, _ in row] for row in table], dtype=torch.long)
        scores = torch.tensor([[weight * score for _, score, _ in row] for row in table], dtype=torch.float32)
        targets = torch.tensor([[target for _, _, target in row] for row in table], dtype=torch.long)
        fallback = torch.tensor([weight * back for _, back in rows], dtype=torch.float32)
        return cls(weight, vocab_size, tokens, scores, targets, fallback)

    def to(self, device: torch.device | str) -> PhraseTree:
        """The same tree with its tables on ``device``."""
        return PhraseTree(self.weight, self.vocab_size, self.tokens.to(device), self.scores.to(device),
                          self.targets.to(device), self.fallback.to(device))


class _Trie:
    """The uncompiled tree: children per node, each node's depth, path score and whether a phrase ends there."""

    def __init__(self) -> None:
        self.children: list[dict[int, int]] = [{}]
        self.score: list[float] = [0.0]
        self.is_end: list[bool] = [False]

    def add(self, ids: Sequence[int]) -> None:
        node = ROOT
        for depth, token in enumerate(ids):
            child = self.children[node].get(token)
            if child is None:
                child = len(self.children)
                self.children[node][token] = child
                self.children.append({})
                self.score.append(self.score[node] + token_score(depth))
                self.is_end.append(False)
            node = child
        self.is_end[node] = True

    def failure_links(self) -> list[int]:
        """Each node's longest proper suffix that is also a path from the root (Aho-Corasick), breadth first."""
        fail = [ROOT] * len(self.children)
        queue = deque(self.children[ROOT].values())  # depth-1 nodes fail to the root
        while queue:
            node = queue.popleft()
            for token, child in self.children[node].items():
                suffix = fail[node]
                while suffix != ROOT and token not in self.children[suffix]:
                    suffix = fail[suffix]
                fail[child] = self.children[suffix].get(token, ROOT)
                queue.append(child)
        return fail

    def outcomes(self, node: int, fail: list[int]) -> tuple[list[tuple[int, float, int]], float]:
        """Node ``node``'s listed tokens ``(token, bonus, next node)`` and the bonus of every other token.

        Walks the failure chain as NeMo's back-off does: a child of a node on the chain is reached after paying
        the back-offs of the nodes before it; a token is listed at its first (deepest) occurrence.
        """
        entries: list[tuple[int, float, int]] = []
        seen: set[int] = set()
        paid = 0.0
        while True:
            for token, child in self.children[node].items():
                if token not in seen:
                    seen.add(token)
                    entries.append((token, paid + self.score[child] - self.score[node], child))
            if node == ROOT:
                return entries, paid  # every other token: a 0 bonus at the root (unk_score), back at the root
            if not self.is_end[node]:  # a finished phrase keeps its bonus
                paid += self.score[fail[node]] - self.score[node]
            node = fail[node]


@dataclass(frozen=True, eq=False)
class Boost:
    """The trees of one batch's rows joined into one table, which a decoder step reads (see the module docstring).

    A row's node in the joined table is ``offsets[row] + its node in its own tree``; rows without hotwords have
    offset -1. Decoder states keep each stream's node in its own tree, so they batch like any other state.
    """

    offsets: Tensor  # (B,) int64 first node of the row's tree; -1: the row has no hotwords
    tokens: Tensor  # (Q, K) joined PhraseTree.tokens (padding: vocab_size)
    scores: Tensor  # (Q, K)
    targets: Tensor  # (Q, K) int64 node within the row's own tree
    fallback: Tensor  # (Q,)
    vocab_size: int

    @classmethod
    def of(cls, trees: Sequence[PhraseTree | None], device: torch.device | None = None) -> Boost | None:
        """The joined table of a batch whose row ``b`` has ``trees[b]``; None when no row has one (nothing to do)."""
        distinct: dict[int, PhraseTree] = {}
        for tree in trees:
            if tree is not None:
                distinct.setdefault(id(tree), tree)
        if not distinct:
            return None
        parts = list(distinct.values())
        starts, total = {}, 0
        for tree in parts:
            starts[id(tree)] = total
            total += tree.num_nodes
        offsets = torch.tensor([-1 if t is None else starts[id(t)] for t in trees], dtype=torch.long)
        first = parts[0]
        if len(parts) == 1:
            tokens, scores, targets, fallback = first.tokens, first.scores, first.targets, first.fallback
        else:
            width = max(t.tokens.shape[1] for t in parts)
            tokens = torch.cat([_pad(t.tokens, width, first.vocab_size) for t in parts])
            scores = torch.cat([_pad(t.scores, width, 0.0) for t in parts])
            targets = torch.cat([_pad(t.targets, width, 0) for t in parts])
            fallback = torch.cat([t.fallback for t in parts])
        device = device or first.tokens.device
        return cls(offsets.to(device), tokens.to(device), scores.to(device), targets.to(device),
                   fallback.to(device), first.vocab_size)

    def nodes(self, rows: Tensor, local: Tensor) -> Tensor:
        """Joined-table nodes ``(R,)`` of batch rows ``rows (R,)`` whose own-tree nodes are ``local (R,)``; -1
        for rows without hotwords."""
        offset = self.offsets[rows]
        return torch.where(offset >= 0, offset + local, -1)

    def bonus(self, nodes: Tensor) -> Tensor:
        """The weighted bonus ``(R, V - 1)`` of every token in joined-table nodes ``nodes (R,)`` (all >= 0)."""
        out = self.fallback[nodes][:, None].repeat(1, self.vocab_size + 1)  # (R, V): the last column takes padding
        out.scatter_(1, self.tokens[nodes], self.scores[nodes])
        return out[:, : self.vocab_size]

    def rows_bonus(self, rows: Tensor, local: Tensor) -> Tensor:
        """The weighted bonus ``(R, V - 1)`` of batch rows ``rows (R,)`` at own-tree nodes ``local (R,)``; all 0 for
        rows without hotwords."""
        nodes = self.nodes(rows, local)
        return self.bonus(nodes.clamp(min=0)).masked_fill_((nodes < 0)[:, None], 0.0)

    def advance(self, nodes: Tensor, labels: Tensor) -> Tensor:
        """Own-tree nodes ``(R,)`` after emitting ``labels (R,)`` in joined-table nodes ``nodes (R,)`` (all >= 0)."""
        match = self.tokens[nodes] == labels[:, None]  # (R, K): at most one listed entry per token
        k = match.to(torch.int8).argmax(dim=1)  # (R,)
        target = self.targets[nodes].gather(1, k[:, None])[:, 0]
        return torch.where(match.any(dim=1), target, ROOT)


def _pad(table: Tensor, width: int, value: float | int) -> Tensor:
    """``table (Q, K)`` widened to ``(Q, width)`` with ``value``."""
    if table.shape[1] == width:
        return table
    return torch.nn.functional.pad(table, (0, width - table.shape[1]), value=value)
