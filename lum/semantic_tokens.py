"""Semantic-ID item tokens for the behaviour tokenizer (the glue between `lum.tokenizer` and `lum.semantic_ids`).

Every item becomes L code tokens `S<level>:<code>` plus a tie-break token `T:<k>` that separates items whose
L codes collide. Codes come from the item's content alone (the items table), so an item never seen in any
behaviour still gets a meaningful, shared-structure tokenization. A new item whose tie-break exceeds the ones in
the vocabulary takes the largest tie-break token (it then shares its tokens with another item: counted in the
report as a collision).

State (saved as `semantic_ids.npz`): the fitted content encoder, the residual quantizer, the item ids in table
order with their codes [N, L + 1], the token ids of each item, and the code report (usage per level, collision
rate, max tie-break).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contracts.files import atomic_path
from lum.errors import TokenizerError
from lum.semantic_ids import (
    ContentEncoder,
    ContentFeatureConfig,
    ResidualKMeansConfig,
    ResidualQuantizer,
    assign_tiebreak,
    build_content_vectors,
    code_report,
)


def _content_config(config: Any) -> ContentFeatureConfig:
    return ContentFeatureConfig(
        text_columns=tuple(config.text_columns),
        categorical_columns=tuple(config.categorical_columns),
        numeric_columns=tuple(config.numeric_columns),
        vector_column=config.vector_column,
        seed=config.seed,
    )


def _item_token_ids(codes: np.ndarray, token_to_id: dict[str, int], levels: int) -> np.ndarray:
    """[N, L + 1] codes (last column the tie-break) -> [N, L + 1] token ids (tie-breaks clipped to the vocabulary)."""
    max_tiebreak = max(int(t[2:]) for t in token_to_id if t.startswith("T:"))
    out = np.empty_like(codes)
    for level in range(levels):
        out[:, level] = [token_to_id[f"S{level}:{c}"] for c in codes[:, level]]
    out[:, levels] = [token_to_id[f"T:{min(int(k), max_tiebreak)}"] for k in codes[:, levels]]
    return out


def fit_semantic_ids(items: pd.DataFrame, config: Any, first_token_id: int) -> tuple[dict[str, Any], list[str]]:
    """Fit content encoder + residual k-means on the items table; returns the state and the code tokens."""
    content = _content_config(config)
    if not content.columns:
        raise TokenizerError(
            "semantic item tokenization needs content columns: pass --text-column, --categorical-column, "
            f"--numeric-column or --vector-column (the items table has: {', '.join(map(str, items.columns))})"
        )
    try:
        vectors, encoder = build_content_vectors(items, content)
    except ValueError as exc:
        raise TokenizerError(f"items table: {exc}") from exc
    quantizer = ResidualQuantizer(
        ResidualKMeansConfig(levels=config.semantic_levels, codebook_size=config.semantic_codebook_size, seed=config.seed)
    ).fit(vectors)
    codes = quantizer.encode(vectors)
    tiebreak = assign_tiebreak(codes)
    all_codes = np.concatenate([codes, tiebreak[:, None]], axis=1)
    tokens = [f"S{level}:{c}" for level, size in enumerate(quantizer.codebook_sizes) for c in range(size)]
    tokens += [f"T:{k}" for k in range(int(tiebreak.max()) + 1)]
    token_to_id = {t: first_token_id + i for i, t in enumerate(tokens)}
    state = {
        "encoder": encoder,
        "quantizer": quantizer,
        "item_ids": items["item_id"].astype(str).to_numpy(),
        "codes": all_codes,
        "report": code_report(codes, quantizer.codebook_sizes),
    }
    state["item_tokens"] = dict(zip(state["item_ids"], _item_token_ids(all_codes, token_to_id, config.semantic_levels)))
    return state, tokens


def add_items(state: dict[str, Any], items: pd.DataFrame, token_to_id: dict[str, int]) -> dict[str, Any]:
    """Codes for items not in `state`, from their content alone (the quantizer is not refitted)."""
    known = set(state["item_ids"])
    new = items[~items["item_id"].astype(str).isin(known)]
    if new.empty:
        return state
    levels = state["codes"].shape[1] - 1
    codes = state["quantizer"].encode(state["encoder"].transform(new))
    # tie-breaks continue after the existing items with the same codes
    combined = assign_tiebreak(np.concatenate([state["codes"][:, :levels], codes]))[len(state["codes"]) :]
    new_codes = np.concatenate([codes, combined[:, None]], axis=1)
    out = dict(state)
    out["item_ids"] = np.concatenate([state["item_ids"], new["item_id"].astype(str).to_numpy()])
    out["codes"] = np.concatenate([state["codes"], new_codes])
    out["item_tokens"] = {**state["item_tokens"], **dict(zip(new["item_id"].astype(str), _item_token_ids(new_codes, token_to_id, levels)))}
    return out


def save_semantic_state(state: dict[str, Any], path: Path) -> None:
    """One .npz: arrays as they are, everything else as JSON in `meta`."""
    arrays: dict[str, np.ndarray] = {"item_ids": state["item_ids"].astype(str), "codes": state["codes"]}
    meta: dict[str, Any] = {"report": state["report"], "tokens": {k: v.tolist() for k, v in state["item_tokens"].items()}}
    for name in ("encoder", "quantizer"):
        part = state[name].to_state()
        meta[name] = {}
        for key, value in part.items():
            if isinstance(value, np.ndarray):
                arrays[f"{name}.{key}"] = value
            else:
                meta[name][key] = value
    arrays["meta"] = np.array(json.dumps(meta))
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to any other name
        np.savez(tmp, **arrays)


def load_semantic_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise TokenizerError(f"{path} not found: a semantic-ID tokenizer needs its codebooks beside it")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    parts = {}
    for name in ("encoder", "quantizer"):
        part = dict(meta[name])
        part.update({k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(name + ".")})
        parts[name] = part
    return {
        "encoder": ContentEncoder.from_state(parts["encoder"]),
        "quantizer": ResidualQuantizer.from_state(parts["quantizer"]),
        "item_ids": arrays["item_ids"],
        "codes": arrays["codes"],
        "report": meta["report"],
        "item_tokens": {k: np.asarray(v, dtype=np.int64) for k, v in meta["tokens"].items()},
    }
