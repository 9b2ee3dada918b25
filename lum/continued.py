"""Continued pretraining (PLUM's CPT): start from a trained model, extend its vocabulary for a newer window.

New frequent items, new categories and new condition combinations of the newer window are appended at the end
of the vocabulary (a token's kind is its prefix, so appending keeps every existing id). The embedding and output
rows of new tokens start at the mean of the existing rows (transformers' mean resizing), then training goes on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import LlamaForCausalLM

from lum.model import read_manifest
from lum.tokenizer import BehaviourTokenizer, _category_map, _condition_vocab


def load_for_continued_pretraining(model_dir: str | Path) -> tuple[BehaviourTokenizer, LlamaForCausalLM, dict[str, Any]]:
    manifest = read_manifest(model_dir)
    tokenizer = BehaviourTokenizer.load(model_dir, expected_fingerprint=manifest["tokenizer_fingerprint"])
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    return tokenizer, model, manifest


def extend_for_window(tokenizer: BehaviourTokenizer, events: pd.DataFrame, items: pd.DataFrame | None) -> BehaviourTokenizer:
    """A tokenizer that knows everything `tokenizer` knows plus the new window's conditions and items."""
    config = tokenizer.config
    behaviours = tokenizer.behaviours(events)
    known = set(tokenizer.vocab)
    new_tokens = [t for t in _condition_vocab(behaviours, config.condition_columns, config.min_condition_count) if t not in known]
    item_category = dict(tokenizer.item_category)
    if config.item_tokenization == "id":
        item_category.update(_category_map(items, config.category_column))
        new_tokens += sorted({f"CAT:{c}" for c in item_category.values()} - known)
        counts = behaviours["item_id"].astype(str).value_counts()
        new_tokens += sorted({f"I:{i}" for i in counts[counts >= config.min_item_count].index} - known)
    semantic = tokenizer.semantic
    if config.item_tokenization == "semantic" and items is not None:
        from lum.semantic_tokens import add_items

        semantic = add_items(tokenizer.semantic, items, tokenizer.token_to_id)
    return BehaviourTokenizer(config=replace(config), vocab=tokenizer.vocab + new_tokens, item_category=item_category, semantic=semantic)
