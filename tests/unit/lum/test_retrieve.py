"""lum.retrieve's constrained beam search on a hand-built trie and engine (the e2e tests in tests/test_retrieve.py run
it on trained LMs, torch and vLLM): the search only ever returns catalogue items, scores each by the sum of its
tokens' log-probabilities, is exhaustive when the beam is wide, and asks the engine nothing for single-child steps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lum.embed import QueryGroup
from lum.retrieve import Branch, ItemTrie, beam_search

# a two-level catalogue: token sequences (first code, second code) -> item ids; prefix (9,) has a single child
CATALOGUE = {(5, 7): ("a",), (5, 8): ("b",), (6, 7): ("c",), (6, 8): ("d", "d2"), (9, 7): ("e",)}


def _trie() -> ItemTrie:
    children: dict[tuple[int, ...], set[int]] = {}
    sizes: dict[tuple[int, ...], int] = {}
    for sequence, names in CATALOGUE.items():
        for level in range(3):
            sizes[sequence[:level]] = sizes.get(sequence[:level], 0) + len(names)
            if level < 2:
                children.setdefault(sequence[:level], set()).add(sequence[level])
    return ItemTrie(depth=2, children={p: np.array(sorted(c), dtype=np.int64) for p, c in children.items()}, items=dict(CATALOGUE), sizes=sizes)


class TableEngine:
    """A retrieval engine whose next-token log-probabilities are a fixed table of (condition, item tokens so far):
    renormalised over the allowed tokens and best first, as the RetrievalEngine protocol asks. Counts its branches."""

    def __init__(self, weights: dict[tuple[int, ...], dict[int, float]]):
        self.weights = weights
        self.branches: list[Branch] = []

    def expand(self, requests: list[tuple[np.ndarray, list[Branch]]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        out = []
        for _, branches in requests:
            answers = []
            for branch in branches:
                self.branches.append(branch)
                table = self.weights[tuple(int(t) for t in branch.suffix)]
                p = np.array([table[int(t)] for t in branch.allowed])
                logprobs = np.log(p / p.sum())
                order = np.lexsort((branch.allowed, -logprobs))[: branch.k]
                answers.append((branch.allowed[order], logprobs[order]))
            out.append(answers)
        return out

    def close(self) -> None:
        pass


COND = 3  # the condition token of the one query
WEIGHTS = {(COND,): {5: 0.5, 6: 0.3, 9: 0.2}, (COND, 5): {7: 0.1, 8: 0.9}, (COND, 6): {7: 0.6, 8: 0.4}}


def _group() -> QueryGroup:
    return QueryGroup("u1", tokens=np.array([1, 40, 41], dtype=np.int64), prefix_lengths=np.array([3]), conditions=np.array([COND]))


def _exhaustive() -> list[tuple[str, float]]:
    """Every catalogue item with log P(first) + log P(second | first) under the constraint."""
    scores = []
    for (first, second), names in CATALOGUE.items():
        top = WEIGHTS[(COND,)]
        score = np.log(top[first] / sum(top.values()))
        if (COND, first) in WEIGHTS:  # (9,) has a single child: probability 1
            below = WEIGHTS[(COND, first)]
            score += np.log(below[second] / sum(below[t] for t in (7, 8)))
        scores += [(name, float(score)) for name in names]
    return sorted(scores, key=lambda e: (-e[1], e[0]))


def test_a_wide_beam_is_exhaustive_scoring_with_ties_by_item_id():
    engine = TableEngine(WEIGHTS)
    ((got,),) = beam_search(engine, _trie(), [_group()], beam=10, top=10)
    expected = _exhaustive()
    assert [name for name, _ in got] == [name for name, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected])
    assert got[0] == ("b", pytest.approx(np.log(0.5 * 0.9)))  # 0.45: the best path
    assert [name for name, _ in got].index("d") + 1 == [name for name, _ in got].index("d2")  # one sequence, two items: by id


def test_a_narrow_beam_returns_only_catalogue_items_and_single_children_cost_no_engine_call():
    engine = TableEngine(WEIGHTS)
    ((got,),) = beam_search(engine, _trie(), [_group()], beam=1, top=2)
    names = [name for name, _ in got]
    assert len(names) == 2 and set(names) <= {n for v in CATALOGUE.values() for n in v}
    assert names[0] == "b"  # greedy: first code 5 (0.5), then 8 (0.9)
    # the engine was asked for the first code and for the children of the kept prefixes: never for (9,), whose one child
    # needs no model call, nor with a suffix that is not a catalogue prefix
    asked = [tuple(int(t) for t in b.suffix[1:]) for b in engine.branches]
    assert asked[0] == () and (9,) not in asked and all(p in _trie().children for p in asked)
    assert all(b.prefix_length == 3 and b.suffix[0] == COND and b.k <= 2 for b in engine.branches)


def test_keep_holds_the_beam_then_more_prefixes_until_their_subtrees_hold_top_items():
    trie = _trie()
    ranked = [((6,), -0.1), ((5,), -0.2), ((9,), -0.3)]
    assert trie.keep(ranked, beam=1, top=1) == ranked[:1]
    assert trie.keep(ranked, beam=1, top=3) == ranked[:1]  # (6,) alone holds c, d, d2
    assert trie.keep(ranked, beam=1, top=4) == ranked[:2]
    assert trie.keep(ranked, beam=3, top=1) == ranked
    assert trie.n_items == 6


@pytest.mark.parametrize("beam, top", [(0, 5), (5, 0)])
def test_beam_and_top_below_one_are_refused(beam, top):
    with pytest.raises(ValueError, match=f"beam \\({beam}\\) and top \\({top}\\) must be at least 1"):
        beam_search(TableEngine(WEIGHTS), _trie(), [_group()], beam=beam, top=top)


def test_every_query_of_every_group_gets_its_own_list():
    engine = TableEngine({**WEIGHTS, (4,): {5: 0.1, 6: 0.1, 9: 0.8}, (4, 5): {7: 0.5, 8: 0.5}, (4, 6): {7: 0.5, 8: 0.5}})
    two = QueryGroup("u2", tokens=np.array([1, 40], dtype=np.int64), prefix_lengths=np.array([1, 2]), conditions=np.array([COND, 4]))
    got = beam_search(engine, _trie(), [_group(), two], beam=10, top=1)
    assert [[[name for name, _ in q] for q in g] for g in got] == [[["b"]], [["b"], ["e"]]]
    assert {b.prefix_length for b in engine.branches} == {3, 1, 2}
    assert list(itertools.chain.from_iterable(got))  # nothing empty
