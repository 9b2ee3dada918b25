"""The behaviour tokenizer: events -> token ids.

Vocabulary (a token's kind is its prefix, so a vocabulary extended later by continued pretraining simply
appends tokens at the end):

    [PAD] [BOS] [UNK_CONDITION] [UNK_ITEM]     special tokens
    C:surface=home|device=mobile ...           condition tokens (full combinations and their coarser back-offs)
    CAT:<category> ...                         item side: category tokens (the fallback of rare and new items)
    I:<item_id> ...                            item side, id mode: one token per frequent item
    S0:<code> S1:<code> ... T:<k>              item side, semantic mode: L code levels plus a tie-break

One behaviour is a condition token followed by the item's token(s); a user's history is their behaviours in time
order, truncated to the last `max_history`, after a [BOS]:

    [BOS] c_1 i_1 c_2 i_2 ... c_n i_n                  (id mode: one item token)
    [BOS] c_1 s0 s1 s2 t  c_2 s0 s1 s2 t ...           (semantic mode: L + 1 item tokens)

Condition tokens back off: the full combination of the configured condition columns gets a token when it was
seen at least `min_condition_count` times in the fitting window; otherwise the combination of the first k
columns (k = m-1, ..., 1) that was; otherwise [UNK_CONDITION]. Items: an item seen at least `min_item_count`
times gets its own token; rarer and new items map to their category's token (from the items table), else
[UNK_ITEM], so a cold item still gets a meaningful token. In semantic mode every item, new ones included, gets
codes from its content alone.

The tokenizer is saved as `behaviour_tokenizer.json` (+ `semantic_ids.npz` in semantic mode) with a format
version and a fingerprint of its vocabulary; a model manifest records that fingerprint, and loading a model with a
different tokenizer fails clearly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contracts.files import write_json_atomic
from lum.config import TokenizerConfig  # noqa: F401  (re-exported)
from lum.errors import TokenizerError  # defined apart: lum.semantic_tokens raises it too

FORMAT_VERSION = 1
TOKENIZER_FILE = "behaviour_tokenizer.json"
SEMANTIC_FILE = "semantic_ids.npz"
PAD, BOS, UNK_CONDITION, UNK_ITEM = 0, 1, 2, 3
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[UNK_CONDITION]", "[UNK_ITEM]")
ITEM_SIDE_PREFIXES = ("CAT:", "I:", "S", "T:")


def condition_key(columns: tuple[str, ...], values: tuple[Any, ...]) -> str:
    return "C:" + "|".join(f"{c}={v}" for c, v in zip(columns, values))


@dataclass
class BehaviourTokenizer:
    """Maps conditions and items to token ids. Build with `fit`, persist with `save` / `load`."""

    config: TokenizerConfig
    vocab: list[str]
    item_category: dict[str, str] = field(default_factory=dict)  # item -> category, from the items table
    semantic: Any = None  # lum.semantic_ids state in semantic mode: (encoder, quantizer, codes per item)

    def __post_init__(self) -> None:
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        if len(self.token_to_id) != len(self.vocab):
            raise TokenizerError("tokenizer vocabulary holds duplicate tokens")

    # ------------------------------------------------------------------ vocabulary facts
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def fingerprint(self) -> str:
        payload = json.dumps({"v": FORMAT_VERSION, "vocab": self.vocab, "config": asdict(self.config)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def condition_tokens(self) -> list[str]:
        return [t for t in self.vocab if t.startswith("C:")]

    def condition_names(self, column: str | None = None) -> list[str]:
        """The query condition names the model knows, as `lum embed --conditions` takes them (`surface=home`,
        `surface=home|device=mobile`); with `column`, only the single-column conditions of that column."""
        names = [t[len("C:"):] for t in self.condition_tokens]
        return names if column is None else [n for n in names if n.startswith(f"{column}=") and "|" not in n]

    def condition_token_ids(self) -> np.ndarray:
        """Ids of all condition tokens, [UNK_CONDITION] included."""
        return np.array([UNK_CONDITION] + [i for i, t in enumerate(self.vocab) if t.startswith("C:")], dtype=np.int64)

    def item_side_ids(self) -> np.ndarray:
        """Ids of every token that can follow a condition (categories, items, semantic codes): the softmax support."""
        return np.array([i for i, t in enumerate(self.vocab) if t.startswith(ITEM_SIDE_PREFIXES)], dtype=np.int64)

    def full_condition_tokens(self) -> list[str]:
        """Condition tokens over all configured columns (the queries an embedding job asks)."""
        n = len(self.config.condition_columns)
        return [t for t in self.condition_tokens if t.count("=") == n]

    def item_token_ids(self) -> np.ndarray:
        """Ids of item tokens proper (I:<id>), in vocabulary order."""
        return np.array([i for i, t in enumerate(self.vocab) if t.startswith("I:")], dtype=np.int64)

    # ------------------------------------------------------------------ mapping
    def condition_ids(self, frame: pd.DataFrame) -> np.ndarray:
        """[N] condition token per row of `frame` (which holds the condition columns), with back-off."""
        columns = self.config.condition_columns
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise TokenizerError(
                f"condition column(s) {', '.join(missing)} not in the events (it has {', '.join(map(str, frame.columns))}); "
                "the tokenizer was built for conditions " + ", ".join(columns)
            )
        out = np.full(len(frame), UNK_CONDITION, dtype=np.int64)
        resolved = np.zeros(len(frame), dtype=bool)
        values = frame[list(columns)].astype("string").fillna("?")
        for k in range(len(columns), 0, -1):  # finest first
            keys = "C:" + values[columns[0]].radd(f"{columns[0]}=")
            for c in columns[1:k]:
                keys = keys + "|" + c + "=" + values[c]
            ids = keys.map(self.token_to_id).to_numpy(dtype=float, na_value=np.nan)
            take = ~resolved & ~np.isnan(ids)
            out[take] = ids[take].astype(np.int64)
            resolved |= take
        return out

    def item_ids(self, items: pd.Series) -> np.ndarray:
        """[N, tokens_per_item] item token ids for a series of item ids (own token, else category, else unknown)."""
        items = items.astype("string")
        if self.config.item_tokenization == "semantic":
            return self._semantic_item_ids(items)
        own = items.radd("I:").map(self.token_to_id)
        category = items.map(self.item_category).astype("string").radd("CAT:").map(self.token_to_id)
        ids = own.fillna(category).fillna(UNK_ITEM).to_numpy(dtype=np.int64)
        return ids[:, None]

    def known_items(self) -> list[str]:
        """Every item this tokenizer gives a token of its own or a meaningful shared one, sorted.

        id mode: the items with an own token and every item of the items table (their category token); semantic
        mode: every item with codes (the items table it was fitted on, plus items added by continued pretraining).
        """
        if self.config.item_tokenization == "semantic":
            return sorted(str(i) for i in self.semantic["item_tokens"])
        return sorted({t[2:] for t in self.vocab if t.startswith("I:")} | set(self.item_category))

    def _semantic_item_ids(self, items: pd.Series) -> np.ndarray:
        codes_by_item: dict[str, np.ndarray] = self.semantic["item_tokens"]
        unknown = np.full(self.config.tokens_per_item, UNK_ITEM, dtype=np.int64)
        return np.stack([codes_by_item.get(i, unknown) for i in items.fillna("")]) if len(items) else np.zeros((0, self.config.tokens_per_item), np.int64)

    # ------------------------------------------------------------------ sequences
    def behaviours(self, events: pd.DataFrame) -> pd.DataFrame:
        """The events that count as behaviours, in (user, time) order."""
        frame = events if self.config.history_events == "all" else events[events["label"] == 1]
        return frame.sort_values(["user_id", "ts"], kind="stable")

    def encode_histories(self, events: pd.DataFrame, max_history: int | None = None) -> dict[str, np.ndarray]:
        """user_id -> [1 + n * (1 + tokens_per_item)] token ids: [BOS] then (condition, item tokens) per behaviour."""
        frame = self.behaviours(events)
        limit = max_history or self.config.max_history
        frame = frame.groupby("user_id", sort=False).tail(limit)
        if frame.empty:
            return {}
        cond = self.condition_ids(frame)[:, None]
        items = self.item_ids(frame["item_id"])
        tokens = np.concatenate([cond, items], axis=1)  # [N, 1 + tokens_per_item]
        users = frame["user_id"].to_numpy()
        bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
        return {
            str(users[a]): np.concatenate([[BOS], tokens[a:b].ravel()]) for a, b in zip(bounds[:-1], bounds[1:])
        }

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "config": asdict(self.config),
            "vocab": self.vocab,
            "item_category": self.item_category,
        }
        if self.semantic is not None:
            from lum.semantic_tokens import save_semantic_state

            save_semantic_state(self.semantic, directory / SEMANTIC_FILE)
        path = directory / TOKENIZER_FILE
        write_json_atomic(payload, path, indent=None)
        return path

    @classmethod
    def load(cls, directory: str | Path, expected_fingerprint: str | None = None) -> "BehaviourTokenizer":
        path = Path(directory) / TOKENIZER_FILE
        if not path.exists():
            raise TokenizerError(f"{path} not found: a model folder must hold the behaviour tokenizer it was trained with")
        payload = json.loads(path.read_text())
        if payload.get("format_version") != FORMAT_VERSION:
            raise TokenizerError(
                f"{path}: tokenizer format version {payload.get('format_version')} is not the supported version "
                f"{FORMAT_VERSION}; rebuild it with this version of lum"
            )
        raw = payload["config"]
        raw.setdefault("prompt_align", 1)  # saved before prompt filling existed: its model never saw a fill
        for key in ("condition_columns", "text_columns", "categorical_columns", "numeric_columns"):
            raw[key] = tuple(raw[key])
        semantic = None
        if raw["item_tokenization"] == "semantic":
            from lum.semantic_tokens import load_semantic_state

            semantic = load_semantic_state(Path(directory) / SEMANTIC_FILE)
        tokenizer = cls(
            config=TokenizerConfig(**raw),
            vocab=payload["vocab"],
            item_category=payload["item_category"],
            semantic=semantic,
        )
        if tokenizer.fingerprint != payload["fingerprint"]:
            raise TokenizerError(f"{path}: the vocabulary does not match its recorded fingerprint (the file was edited)")
        if expected_fingerprint is not None and tokenizer.fingerprint != expected_fingerprint:
            raise TokenizerError(
                f"{path}: tokenizer {tokenizer.fingerprint} is not the one the model was trained with "
                f"({expected_fingerprint}); use the tokenizer saved with the model"
            )
        return tokenizer


def _category_map(items: pd.DataFrame | None, column: str) -> dict[str, str]:
    if items is None or column not in items.columns:
        return {}
    frame = items[["item_id", column]].dropna()
    return dict(zip(frame["item_id"].astype(str), frame[column].astype(str)))


def _condition_vocab(events: pd.DataFrame, columns: tuple[str, ...], min_count: int) -> list[str]:
    """Combinations of the first k condition columns (k = m..1) seen at least `min_count` times."""
    values = events[list(columns)].astype("string").fillna("?")
    tokens: list[str] = []
    for k in range(len(columns), 0, -1):
        counts = values.groupby(list(columns[:k]), sort=True).size()
        counts = counts[counts >= min_count]
        keys = counts.index if k > 1 else [(v,) for v in counts.index]
        tokens += [condition_key(columns[:k], key) for key in keys]
    return tokens


def fit_tokenizer(events: pd.DataFrame, config: TokenizerConfig, items: pd.DataFrame | None = None) -> BehaviourTokenizer:
    """Build the vocabulary from the fitting window's events (and the items table for categories/content)."""
    missing = [c for c in config.condition_columns if c not in events.columns]
    if missing:
        raise TokenizerError(
            f"unknown condition column(s) {', '.join(missing)}: the events have {', '.join(map(str, events.columns))}"
        )
    if not config.condition_columns:
        raise TokenizerError("at least one condition column is needed: the behaviour LM predicts items under conditions")
    behaviours = events if config.history_events == "all" else events[events["label"] == 1]
    if behaviours.empty:
        raise TokenizerError(
            "no behaviours in the pretraining window: it holds no events"
            + ("" if config.history_events == "all" else " with label 1")
        )
    vocab = list(SPECIAL_TOKENS)
    vocab += _condition_vocab(behaviours, config.condition_columns, config.min_condition_count)
    item_category = _category_map(items, config.category_column)
    semantic = None
    if config.item_tokenization == "id":
        categories = sorted(set(item_category.values()))
        vocab += [f"CAT:{c}" for c in categories]
        counts = behaviours["item_id"].astype(str).value_counts()
        frequent = sorted(counts[counts >= config.min_item_count].index)
        vocab += [f"I:{i}" for i in frequent]
    else:
        from lum.semantic_tokens import fit_semantic_ids

        if items is None:
            raise TokenizerError("semantic item tokenization needs an items table with content columns")
        semantic, code_tokens = fit_semantic_ids(items, config, first_token_id=len(vocab))
        vocab += code_tokens
        item_category = {}
    return BehaviourTokenizer(
        config=config,
        vocab=vocab,
        item_category=item_category,
        semantic=semantic,
    )
