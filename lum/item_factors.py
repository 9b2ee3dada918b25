"""Shared item-side factors: what items have in common, learned once for all of them while pretraining.

With an id tokenizer every item token has its own input embedding and output row, learned only from that item's
own behaviours. On a marketplace that is a few dozen clicks per item: too few to learn which items are alike, so
the model's item vectors barely reflect the catalogue's structure (measured on the simulator: the cosine of two
items' LM vectors correlated 0.15-0.23 with the cosine of their true taste vectors). Item factors add to every item
token's input embedding and output row

    e[v] = e_id[v] + category_in[category(v)] + content_in @ content(v)        (input side, [H])
    w[v] = w_id[v] + category_out[category(v)] + content_out @ content(v)      (output side, [H])

so whatever one item's behaviour teaches about its category (or about items with similar content) reaches every
item of it, and an item with few behaviours still gets a meaningful vector. The same idea as side information in
item embeddings (category and content features summed into an item's representation), applied to an LM's
vocabulary.

Training-time only: the factors start at zero (step 0 is the plain model) and are folded into the Llama's own
`embed_tokens` and `lm_head` when the model is saved (`fold_into`), so vLLM, transformers and every engine load a
plain Llama whose embeddings and logits are exactly those the objective trained.

Category tokens (the shared token of an item too rare for its own) take their category's factor and the mean
content of their category's items; condition and special tokens get nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from lum.tokenizer import BehaviourTokenizer


@dataclass(frozen=True)
class ItemSideFacts:
    """Per-token inputs of the factors, from the tokenizer and the items table."""

    token_category: np.ndarray  # [V] int64: category index of each token, -1 for tokens without one
    categories: list[str]  # category names, by index
    content: np.ndarray | None  # [V, Dc] float32 standardised content per token (zeros where none), or None


def item_side_facts(tokenizer: BehaviourTokenizer, items: pd.DataFrame | None, use_category: bool, content_column: str | None) -> ItemSideFacts:
    """Each token's category and content. Fails, naming the column, when the items table cannot provide them."""
    if tokenizer.config.item_tokenization != "id":
        raise ValueError("item factors need the id item tokenization: semantic ids already share codes between similar items")
    vocab = tokenizer.vocab
    token_items = {i: t[2:] for i, t in enumerate(vocab) if t.startswith("I:")}
    token_cats = {i: t[4:] for i, t in enumerate(vocab) if t.startswith("CAT:")}
    for i, item in token_items.items():
        category = tokenizer.item_category.get(item)
        if category is not None:
            token_cats[i] = category
    categories = sorted(set(token_cats.values()))
    index = {c: k for k, c in enumerate(categories)}
    token_category = np.full(len(vocab), -1, dtype=np.int64)
    if use_category:
        if not categories:
            raise ValueError(f"item factors: no item has a category (the items table needs a '{tokenizer.config.category_column}' column)")
        for i, c in token_cats.items():
            token_category[i] = index[c]
    content = None
    if content_column is not None:
        content = _token_content(vocab, token_items, token_cats, items, content_column, tokenizer.config.category_column)
    return ItemSideFacts(token_category, categories, content)


def _token_content(vocab, token_items, token_cats, items, column, category_column) -> np.ndarray:
    if items is None or column not in items.columns:
        raise ValueError(f"item factors: the items table has no content column '{column}'")
    frame = items[["item_id", column] + ([category_column] if category_column in items.columns else [])].copy()
    frame["item_id"] = frame["item_id"].astype(str)
    values = frame[column].to_numpy()
    widths = {len(v) for v in values if v is not None}
    if len(widths) != 1 or any(v is None for v in values):
        raise ValueError(f"item factors: column '{column}' must hold one vector of the same length for every item, got lengths {sorted(widths)}")
    matrix = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    matrix = (matrix - matrix.mean(axis=0)) / np.maximum(matrix.std(axis=0), 1e-9)  # standardised: one scale per dimension
    by_item = dict(zip(frame["item_id"], range(len(frame))))
    out = np.zeros((len(vocab), matrix.shape[1]), dtype=np.float32)
    for i, item in token_items.items():
        if item in by_item:
            out[i] = matrix[by_item[item]]
    if category_column in frame.columns:
        means = pd.DataFrame(matrix).groupby(frame[category_column].astype(str).to_numpy()).mean()
        for i, category in token_cats.items():
            if i not in token_items and category in means.index:
                out[i] = means.loc[category].to_numpy()
    return out


class ItemFactors(nn.Module):
    """Category and content components of every token's input embedding and output row, [V, H] when summed."""

    def __init__(self, facts: ItemSideFacts, hidden: int):
        super().__init__()
        n_categories = len(facts.categories)
        # tokens without a category point at an extra row that stays zero (it is appended, never a parameter)
        token_category = np.where(facts.token_category >= 0, facts.token_category, n_categories)
        self.register_buffer("token_category", torch.as_tensor(token_category, dtype=torch.long), persistent=False)
        self.use_category = bool((facts.token_category >= 0).any())
        self.category_in = nn.Parameter(torch.zeros(n_categories, hidden))
        self.category_out = nn.Parameter(torch.zeros(n_categories, hidden))
        self.use_content = facts.content is not None
        content = facts.content if facts.content is not None else np.zeros((len(token_category), 1), np.float32)
        self.register_buffer("content", torch.as_tensor(content, dtype=torch.float32), persistent=False)
        self.content_in = nn.Parameter(torch.zeros(hidden, content.shape[1]))
        self.content_out = nn.Parameter(torch.zeros(hidden, content.shape[1]))

    def _offsets(self, ids: torch.Tensor, category: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """[*ids.shape, H] offsets of the tokens `ids`."""
        out = torch.zeros(*ids.shape, category.shape[1], dtype=category.dtype, device=category.device)
        if self.use_category:
            padded = torch.cat([category, category.new_zeros(1, category.shape[1])])
            out = out + padded[self.token_category[ids]]
        if self.use_content:
            out = out + self.content[ids] @ content.T
        return out

    def input_offsets(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, T, H], added to the token embeddings."""
        return self._offsets(ids, self.category_in, self.content_in)

    def output_offsets(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N] -> [N, H], added to the output rows of the tokens `ids`."""
        return self._offsets(ids, self.category_out, self.content_out)

    @torch.no_grad()
    def fold_into(self, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> None:
        """Add the factors to a plain model's `embed_tokens.weight` and `lm_head.weight` ([V, H], in place)."""
        ids = torch.arange(embed_weight.shape[0], device=embed_weight.device)
        embed_weight += self.input_offsets(ids).to(embed_weight.dtype)
        head_weight += self.output_offsets(ids).to(head_weight.dtype)
