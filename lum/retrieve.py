"""Generative retrieval (LUM's second use of the model, candidate recall): the LM generates the next item.

A query is the embedding job's prompt ([BOS] + the user's behaviours before the as-of time + one condition token,
built by `lum.embed.build_queries`); the model then continues with the item's tokens. Only real items may come
out: the catalogue's token sequences form a prefix trie (`ItemTrie`), and at every step the next token is chosen
among the children of the prefix generated so far (TIGER's and OneRec's constrained beam search).

* semantic-id models: an item is L code tokens + a tie-break token, so the search runs L + 1 steps. After every
  step it keeps the `beam` best prefixes, and more of the next best ones while the kept prefixes' subtrees hold
  fewer than `top` items (so `top` may exceed `beam`: beam 20 / top 100 keeps 20 prefixes where they cover 100
  items and widens where the trie thins out); the result is cut to `top` items. Cold items are reachable: their
  codes come from content.
* id models: an item is one token; retrieval is the top-k of the item logits at the condition token, the same
  search with one step (items without a token of their own cannot be retrieved).

Scores: at every step the log-softmax is taken over the allowed children only, so an item's score is the log of
the probability the model gives it among the catalogue's items (the scores of all catalogue items sum to 1 in
probability). A prefix with a single child costs no model call (its log-probability is 0).

Two engines answer the one question the search asks, "the top-k allowed next tokens of these prompts and their
log-probabilities" (`RetrievalEngine.expand`):

* `TorchRetrievalEngine` (the reference): one forward pass per query group and step; the group's history is in
  the row once and every branch's suffix (condition + tokens so far) attends to the history prefix it belongs to
  and to its own earlier tokens (a custom 4D mask, as the torch embedding engine does);
* `VllmRetrievalEngine` (the production path): one greedy one-token generation per branch, with
  `allowed_token_ids` from the trie and `logprobs_mode=processed_logprobs` (log-probabilities after the mask, so
  renormalised over the allowed tokens); the branches of one history are submitted together and prefix caching
  computes that history once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np
import pandas as pd
import torch

from lum.config import VllmSettings
from lum.embed import QueryGroup, forward_rows, load_for_inference, start_vllm, stop_vllm, token_batches
from lum.tokenizer import PAD, UNK_ITEM, BehaviourTokenizer


@dataclass
class ItemTrie:
    """The catalogue's valid item token sequences.

    depth: tokens per item (1 for id models, L + 1 for semantic ids)
    children: prefix (tuple of token ids, shorter than depth) -> [C] allowed next token ids, sorted
    items: full sequence -> the item ids it stands for (more than one only where tie-breaks ran out)
    sizes: prefix (any length up to depth) -> how many items lie below it
    unreachable: catalogue items without a token sequence of their own (an id model's rare and new items)
    """

    depth: int
    children: dict[tuple[int, ...], np.ndarray]
    items: dict[tuple[int, ...], tuple[str, ...]]
    sizes: dict[tuple[int, ...], int]
    unreachable: int = 0

    @classmethod
    def from_tokenizer(cls, tokenizer: BehaviourTokenizer, catalogue: Iterable[str] | None = None) -> "ItemTrie":
        """The trie of `catalogue` (default: every item the tokenizer can write as tokens of its own)."""
        if tokenizer.config.item_tokenization == "semantic":
            wanted = sorted(str(i) for i in (catalogue if catalogue is not None else tokenizer.semantic["item_tokens"]))
            codes = tokenizer.item_ids(pd.Series(wanted, dtype="string")) if wanted else np.zeros((0, 1), np.int64)
            own = ~(codes == UNK_ITEM).any(axis=1)
        else:
            own_tokens = {t[2:] for t in tokenizer.vocab if t.startswith("I:")}
            wanted = sorted(str(i) for i in (catalogue if catalogue is not None else own_tokens))
            own = np.array([i in own_tokens for i in wanted], dtype=bool)
            codes = np.array([[tokenizer.token_to_id["I:" + i]] if o else [UNK_ITEM] for i, o in zip(wanted, own)], dtype=np.int64).reshape(-1, 1)
        depth = int(codes.shape[1])
        items: dict[tuple[int, ...], list[str]] = {}
        for item, row, ok in zip(wanted, codes, own):
            if ok:
                items.setdefault(tuple(int(t) for t in row), []).append(item)
        if not items:
            raise ValueError("the retrieval catalogue holds no item the model can generate")
        children: dict[tuple[int, ...], set[int]] = {}
        sizes: dict[tuple[int, ...], int] = {}
        for sequence, names in items.items():
            for level in range(depth + 1):
                sizes[sequence[:level]] = sizes.get(sequence[:level], 0) + len(names)
                if level < depth:
                    children.setdefault(sequence[:level], set()).add(sequence[level])
        return cls(
            depth=depth,
            children={prefix: np.array(sorted(next_tokens), dtype=np.int64) for prefix, next_tokens in children.items()},
            items={sequence: tuple(names) for sequence, names in items.items()},
            sizes=sizes,
            unreachable=int((~own).sum()),
        )

    @property
    def n_items(self) -> int:
        return sum(len(v) for v in self.items.values())

    def keep(self, ranked: list[tuple[tuple[int, ...], float]], beam: int, top: int) -> list[tuple[tuple[int, ...], float]]:
        """The prefixes a search step keeps from `ranked` (best first): the first `beam`, then more while their
        subtrees hold fewer than `top` items. At most max(beam, top) prefixes, since every subtree holds an item."""
        kept, covered = [], 0
        for entry in ranked:
            if len(kept) >= beam and covered >= top:
                break
            kept.append(entry)
            covered += self.sizes[entry[0]]
        return kept


@dataclass
class Branch:
    """One question to an engine: the top-k allowed next tokens after history[:prefix_length] + suffix.

    suffix: [1 + s] the query's condition token and the s item tokens chosen so far
    allowed: [C] the trie's children of those s tokens
    """

    prefix_length: int
    suffix: np.ndarray
    allowed: np.ndarray
    k: int


class RetrievalEngine(Protocol):
    def expand(self, requests: list[tuple[np.ndarray, list[Branch]]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """For each (history tokens [L], branches): per branch the top-k allowed tokens [k] and their log-probabilities
        [k] renormalised over the allowed tokens, best first (equal log-probabilities: the lower token id first)."""
        ...

    def close(self) -> None: ...


def _top_k(tokens: np.ndarray, logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (token, log-probability) pairs, best first, ties by token id."""
    order = np.lexsort((tokens, -logprobs))[:k]
    return tokens[order], logprobs[order]


def beam_search(
    engine: RetrievalEngine, trie: ItemTrie, groups: list[QueryGroup], beam: int, top: int
) -> list[list[list[tuple[str, float]]]]:
    """Per group, per query: the `top` items as (item id, log-probability), best first (ties by item id)."""
    if beam < 1 or top < 1:
        raise ValueError(f"beam ({beam}) and top ({top}) must be at least 1")
    states: list[list[list[tuple[tuple[int, ...], float]]]] = [[[((), 0.0)] for _ in range(g.n_queries)] for g in groups]
    width = max(beam, top)  # children asked per prefix: no step keeps more prefixes than this
    for step in range(trie.depth):
        grown: list[list[list[tuple[tuple[int, ...], float]]]] = [[[] for _ in range(g.n_queries)] for g in groups]
        requests, owners = [], []
        for gi, group in enumerate(groups):
            branches = []
            for qi in range(group.n_queries):
                for prefix, score in states[gi][qi]:
                    allowed = trie.children[prefix]
                    if len(allowed) == 1:  # a single child: probability 1 under the constraint, no model call
                        grown[gi][qi].append((prefix + (int(allowed[0]),), score))
                        continue
                    suffix = np.array([group.conditions[qi], *prefix], dtype=np.int64)
                    branches.append(Branch(int(group.prefix_lengths[qi]), suffix, allowed, min(width, len(allowed))))
                    owners.append((gi, qi, prefix, score))
            requests.append((group.tokens, branches))
        if owners:
            answers = [answer for per_group in engine.expand(requests) for answer in per_group]
            for (gi, qi, prefix, score), (tokens, logprobs) in zip(owners, answers):
                grown[gi][qi] += [(prefix + (int(t),), score + float(lp)) for t, lp in zip(tokens, logprobs)]
        states = [[trie.keep(sorted(c, key=lambda entry: (-entry[1], entry[0])), beam, top) for c in per_group] for per_group in grown]
    out = []
    for per_group in states:
        lists = []
        for finished in per_group:
            ranked = sorted(((item, score) for seq, score in finished for item in trie.items[seq]), key=lambda e: (-e[1], e[0]))
            lists.append(ranked[:top])
        out.append(lists)
    return out


class TorchRetrievalEngine:
    """The reference engine: `transformers`, one forward pass per batch of query groups and search step."""

    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32, max_batch_tokens: int = 16_384, threads: int | None = None):
        self.model = load_for_inference(model_dir, dtype, threads)
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def from_model(cls, model: torch.nn.Module, max_batch_tokens: int = 16_384) -> "TorchRetrievalEngine":
        """An engine on a model already in memory (a LlamaForCausalLM in eval mode)."""
        engine = cls.__new__(cls)
        engine.model, engine.max_batch_tokens = model, max_batch_tokens
        return engine

    @staticmethod
    def _row(history: np.ndarray, branches: list[Branch], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Token ids [T], position ids [T], attention mask [T, T] and each branch's last position [Q] of one group."""
        L = len(history)
        ids = np.full(width, PAD, dtype=np.int64)
        pos = np.zeros(width, dtype=np.int64)
        mask = np.zeros((width, width), dtype=bool)
        ids[:L], pos[:L] = history, np.arange(L)
        mask[:L, :L] = np.tril(np.ones((L, L), dtype=bool))  # the history: causal
        last = np.empty(len(branches), dtype=np.int64)
        at = L
        for b, branch in enumerate(branches):
            n, span = branch.prefix_length, np.arange(at, at + len(branch.suffix))
            ids[span] = branch.suffix
            pos[span] = n + np.arange(len(branch.suffix))  # the suffix continues its own prefix
            mask[span, :n] = True  # every suffix token sees the history prefix it belongs to...
            mask[np.ix_(span, span)] = np.tril(np.ones((len(span), len(span)), dtype=bool))  # ...and its own earlier tokens
            last[b] = span[-1]
            at += len(branch.suffix)
        pad = np.arange(at, width)
        mask[pad, pad] = True  # padding sees only itself (a row with nothing to attend to would give NaN)
        return ids, pos, mask, last

    @torch.no_grad()
    def expand(self, requests: list[tuple[np.ndarray, list[Branch]]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        out: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in requests]
        sizes = [len(h) + sum(len(b.suffix) for b in branches) for h, branches in requests]
        for batch in token_batches(sizes, self.max_batch_tokens, rows=[i for i in range(len(requests)) if requests[i][1]]):
            width = max(sizes[i] for i in batch)
            rows = [self._row(requests[i][0], requests[i][1], width) for i in batch]
            hidden = forward_rows(self.model, rows)
            for r, i in enumerate(batch):
                logits = self.model.lm_head(hidden[r, torch.from_numpy(rows[r][3])]).float()  # [Q, V]
                for branch, row in zip(requests[i][1], logits):
                    allowed = torch.from_numpy(branch.allowed)
                    logprobs = torch.log_softmax(row[allowed], dim=0).numpy().astype(np.float64)
                    out[i].append(_top_k(branch.allowed, logprobs, branch.k))
        return out

    def close(self) -> None:
        pass


class VllmRetrievalEngine:
    """vLLM's generate runner: one greedy token per branch, the trie's children as `allowed_token_ids`."""

    def __init__(self, model_dir: str, max_model_len: int, max_logprobs: int, settings: VllmSettings = VllmSettings()):
        # log-probabilities after the allowed-token mask: renormalised over the trie's children, as the torch engine's
        self.llm, self._watchdog = start_vllm(model_dir, max_model_len, settings, runner="generate", max_logprobs=max_logprobs,
                                              logprobs_mode="processed_logprobs")

    def expand(self, requests: list[tuple[np.ndarray, list[Branch]]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params, flat = [], [], []
        for history, branches in requests:  # one history's branches adjacent: prefix caching computes it once
            for branch in branches:
                prompts.append(TokensPrompt(prompt_token_ids=history[: branch.prefix_length].tolist() + branch.suffix.tolist()))
                params.append(SamplingParams(max_tokens=1, temperature=0.0, logprobs=branch.k,
                                             allowed_token_ids=branch.allowed.tolist(), detokenize=False))
                flat.append(branch)
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        answers = []
        for branch, output in zip(flat, outputs):
            # the sampled token is always in the dict; beyond it, the k best by log-probability
            returned = output.outputs[0].logprobs[0]
            tokens = np.fromiter(returned.keys(), dtype=np.int64, count=len(returned))
            logprobs = np.array([returned[int(t)].logprob for t in tokens], dtype=np.float64)
            answers.append(_top_k(tokens, logprobs, branch.k))
        out, at = [], 0
        for _, branches in requests:
            out.append(answers[at : at + len(branches)])
            at += len(branches)
        return out

    def close(self) -> None:
        stop_vllm(self.llm, self._watchdog)
