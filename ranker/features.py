"""From a training-set table to model inputs: vocabularies, dense normalisation, LUM "interest matching", KJTs.

Shapes: N rows, K LUM conditions, D the LUM dimension, F_dense dense features, B a batch.

DLRM inputs
  sparse   one KeyedJaggedTensor key per single-valued categorical column (user, item, the item's category, every
           request-context column) with one id per row; the pooled-history variants add `hist_item_ids` and
           `hist_categories` as multi-valued keys that share the embedding table of `item_id` / `item_category`
           (one EmbeddingBagConfig with two feature names, MEAN pooling), so a history item and a target item are
           the same vector. Ids come from vocabularies fitted on the training rows; 0 is the out-of-vocabulary id
           (unseen, rare or null values), a trained row of its own.
  dense    counters (signed log1p, then standardised with training statistics), the counter flags, and for the
           LUM variants the K similarities dot(user_k, item) (the LM's own logit: item vectors are its output
           rows), the K cosines, and `lum_sim_request` / `lum_cos_request`, the ones under the condition that
           matches the row's request context (most specific match wins); with `lum_inputs="vectors"` also the K
           user vectors flattened and the item vector. A missing value becomes 0 after standardisation (the
           training mean) and a flag says so.
  din      (the target-attention variants) instead of the mean-pooled history keys, per-position keys for a
           TorchRec EmbeddingCollection: `din_item` / `din_category` (the target's item and category, one id per
           row) sharing their tables with `hist_item_ids` / `hist_categories` (the last `history_len` behaviours),
           then `hist_age`, each behaviour's age bucket (request time minus `hist_ts`; ranker/din.py).
LightGBM inputs
  The same information as one float matrix: categorical codes (declared categorical; the user and item ids
  only with `lightgbm_ids`), raw counters and LUM scores (NaN for missing: LightGBM routes missing values
  itself), and the pooled history as numbers a tree can use (its length, the share of its items in the target's
  category, whether the target item is in it). The din variants add target-aware history numbers: the max, mean
  and last-5 mean cosine between the target's item factors and the behaviours' (factors from the users'
  co-engagements before the fitting window, `ItemFactors`), how often and how long ago the target's category was
  engaged, and how long ago the target item itself was.
Request features (`request_features=True`, both models)
  A pointwise model scores each candidate alone. These give it the candidate's place among the other candidates
  of its request (the rows sharing the user and the request time): for the item counters and, with LUM, the K + 1
  similarities and cosines, the value minus the request's mean, minus the request's max, and the rank (1 = best).
  Only feature values of the same request are read (no label, no other request), so they are as point-in-time
  correct as the features they compare; a request must be scored with all of its candidates together.

Only columns the FeatureSchema lists are read; nothing else in the table can reach the model.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec import EmbeddingBagConfig, EmbeddingConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from contracts.names import HISTORY_TIMES, ITEM_COUNTERS
from ranker.config import FeatureConfig  # noqa: F401  (re-exported)
from ranker.din import AGE_KEY, TARGET_CATEGORY_KEY, TARGET_ITEM_KEY, age_buckets
from ranker.schema import (
    FLAG_COLUMNS,
    HISTORY_CATEGORIES,
    HISTORY_ITEMS,
    LUM_ITEM_COLUMN,
    LUM_USER_PREFIX,
    REQUEST_CONDITION,
    FeatureSchema,
    RankerInputError,
    parse_condition,
    variant_attention,
    variant_parts,
)

OOV = 0  # id of unseen / rare / null values in every vocabulary


# ---------------------------------------------------------------------------------------------------- arrow reads


def _strings(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one string array (dictionary-decoded, numbers printed), nulls kept."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if not pa.types.is_string(array.type):
        array = pc.cast(array, pa.string())
    return array


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    """[N] float64, NaN for null."""
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _lists(column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """A list column as (flat values, offsets [N + 1]); a null list is an empty one."""
    array = column.combine_chunks()
    if pa.types.is_null(array.type):  # every row null (a DataFrame of cold rows): all lists empty
        return pa.array([], pa.string()), np.zeros(len(array) + 1, dtype=np.int64)
    lengths = pc.list_value_length(array).fill_null(0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return array.flatten(), offsets


def _last(offsets: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the last `keep` elements of every row of a jagged array, and the new offsets [N + 1]."""
    lengths = np.minimum(np.diff(offsets), keep)
    starts = offsets[1:] - lengths
    new_offsets = np.zeros_like(offsets)
    np.cumsum(lengths, out=new_offsets[1:])
    positions = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return positions, new_offsets


def _vectors(column: pa.ChunkedArray, dim: int, name: str) -> np.ndarray:
    """A list<float> column as [N, D] float32 with NaN rows where the vector is null."""
    array = column.combine_chunks()
    if pa.types.is_null(array.type):  # every row null: all vectors missing
        return np.full((len(array), dim), np.nan, dtype=np.float32)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    out = np.full((len(array), dim), np.nan, dtype=np.float32)
    if values.size != int(valid.sum()) * dim:
        raise RankerInputError(f"column {name} holds vectors whose length is not lum_dim = {dim}")
    out[valid] = values.reshape(-1, dim)
    return out


# ---------------------------------------------------------------------------------------------------- vocabularies


class Vocabulary:
    """String values -> ids 1..V (most frequent first); everything else -> OOV (0). Table rows: V + 1."""

    def __init__(self, values: list[str]):
        self.values = list(values)
        self._lookup = pa.array(self.values, pa.string())

    @classmethod
    def fit(cls, arrays: list[pa.Array], min_count: int = 1, max_vocab: int | None = None) -> Vocabulary:
        counts = pc.value_counts(pa.concat_arrays([_strings(a) for a in arrays])).flatten()
        frame = pd.DataFrame({"value": counts[0].to_pandas(), "count": counts[1].to_numpy()}).dropna()
        frame = frame[frame["count"] >= min_count].sort_values(["count", "value"], ascending=[False, True], kind="stable")
        if max_vocab is not None:
            frame = frame.iloc[:max_vocab]
        return cls(frame["value"].tolist())

    @property
    def num_embeddings(self) -> int:
        return len(self.values) + 1

    def ids(self, array: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """[N] int64 ids, OOV for unknown and null."""
        index = pc.index_in(_strings(array), value_set=self._lookup)
        return index.fill_null(-1).to_numpy().astype(np.int64) + 1


# ---------------------------------------------------------------------------------------------------- item factors

TARGET_AWARE_NAMES = ("din_sim_max", "din_sim_mean", "din_sim_last5", "din_category_count", "din_hours_since_category",
                      "din_hours_since_item", "din_category_share_last5")
LM_TARGET_AWARE_NAMES = ("din_lm_sim_max", "din_lm_sim_mean", "din_lm_sim_last5")  # din+lum: the LM's item vectors


class ItemFactors:
    """Unit-length item vectors [V, k] from co-engagement: the truncated SVD of the user x item matrix of which
    items the same users engaged before the fitting window starts. A tree cannot compare two item ids; it can use
    the cosine of their factors.

    Only behaviours stamped before the earliest fitting row count (each row's history holds its user's last engaged
    items with their times): a behaviour inside the window is some fitting row's label, and factors that knew it
    would tell the trees which candidates were clicked (a first version that used every history fell from 0.7098
    to 0.6991 validation AUC on the demo: the fitting rows' labels leaked through the factors)."""

    def __init__(self, items: list[str], vectors: np.ndarray):
        self.items = list(items)
        # rounded as saved (to_json), so a loaded pipeline computes exactly what the trained one did
        vectors = np.round(np.asarray(vectors, dtype=np.float32), 6)
        self.matrix = vectors.reshape(len(self.items), -1) if len(self.items) else np.zeros((0, 1), dtype=np.float32)
        self._lookup = pa.array(self.items, pa.string())

    @classmethod
    def fit(cls, table: pa.Table, schema: FeatureSchema, dim: int = 16, seed: int = 0) -> ItemFactors:
        from scipy.sparse import csr_matrix
        from sklearn.decomposition import TruncatedSVD

        pairs = cls.engagements_before(table, schema)
        user_codes, _ = pd.factorize(pairs["user"], sort=True)
        item_codes, items = pd.factorize(pairs["item"], sort=True)
        k = min(dim, len(items) - 1, int(user_codes.max(initial=0)))
        if k < 1:  # too few histories to factorise: every similarity is missing
            return cls([], np.zeros((0, 1), dtype=np.float32))
        matrix = csr_matrix((np.ones(len(pairs)), (user_codes, item_codes)), shape=(int(user_codes.max()) + 1, len(items)))
        svd = TruncatedSVD(n_components=k, random_state=seed).fit(matrix)
        vectors = (svd.components_.T * svd.singular_values_).astype(np.float32)  # [V, k]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return cls(list(items), np.where(norms > 0, vectors / np.where(norms > 0, norms, 1), np.nan))

    @classmethod
    def from_lm_items(cls, table: pa.Table, schema: FeatureSchema) -> ItemFactors:
        """The LM's item vectors (unit length) of every item that is a target in `table`: a model version's item
        vectors are static content of the model, not behaviour, so any row may contribute its target's."""
        dim = int(schema.lum_dim or 0)
        vectors = _vectors(table.column(LUM_ITEM_COLUMN), dim, LUM_ITEM_COLUMN)
        items = _strings(table.column(schema.item)).to_numpy(zero_copy_only=False)
        keep = ~np.isnan(vectors).any(axis=1) & pd.notna(items)
        frame = pd.DataFrame({"item": items[keep], "row": np.flatnonzero(keep)}).drop_duplicates("item")
        chosen = vectors[frame["row"].to_numpy()]
        with np.errstate(invalid="ignore", divide="ignore"):
            chosen = chosen / np.linalg.norm(chosen, axis=1, keepdims=True)
        return cls(frame["item"].tolist(), chosen.reshape(len(frame), dim) if len(frame) else np.zeros((0, max(dim, 1))))

    @staticmethod
    def engagements_before(table: pa.Table, schema: FeatureSchema) -> pd.DataFrame:
        """The distinct (user, item) engagements of the rows' histories stamped before the table's earliest row."""
        values, offsets = _lists(table.column(HISTORY_ITEMS))
        times = pc.cast(_lists(table.column(HISTORY_TIMES))[0], pa.float64()).to_numpy(zero_copy_only=False)
        start = pc.min(pc.cast(pc.cast(table.column(schema.time), pa.timestamp("us", tz="UTC")), pa.int64())).as_py()
        before = times < (start / 1e6 if start is not None else -np.inf)  # engaged before the fitting window
        users = _strings(table.column(schema.user)).take(pa.array(np.repeat(np.arange(table.num_rows), np.diff(offsets))))
        pairs = pd.DataFrame({"user": users.to_numpy(zero_copy_only=False), "item": _strings(values).to_numpy(zero_copy_only=False)})
        return pairs[before].dropna().drop_duplicates().reset_index(drop=True)

    def vectors(self, items: pa.Array) -> np.ndarray:
        """[n, k] unit vectors of `items`, NaN rows for items without factors."""
        index = pc.index_in(_strings(items), value_set=self._lookup).fill_null(-1).to_numpy().astype(np.int64)
        out = np.full((len(index), self.matrix.shape[1]), np.nan, dtype=np.float32)
        out[index >= 0] = self.matrix[index[index >= 0]]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "vectors": self.matrix.tolist()}  # rounded to 6 decimals already

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ItemFactors:
        return cls(data["items"], np.asarray(data["vectors"], dtype=np.float32))


# ---------------------------------------------------------------------------------------------------- LUM features


@dataclass
class LumFeatures:
    """The LUM block of N rows; NaN marks what is missing."""

    users: np.ndarray  # [N, K, D] user-interest vectors, one per query condition
    item: np.ndarray  # [N, D] the target item's vector
    sims: np.ndarray  # [N, K] dot(users[:, k], item): the LM's logit for the item under condition k
    sim_request: np.ndarray  # [N] the similarity under the condition matching the row's request context
    cosines: np.ndarray  # [N, K] cosine(users[:, k], item): the match without the vectors' norms (popularity, confidence)
    cos_request: np.ndarray  # [N] the cosine under the request condition
    request_missing: np.ndarray  # [N] 1.0 when no condition matches the row or a vector is missing
    missing: np.ndarray  # [N] 1.0 when any LUM vector of the row is null


def request_condition(table: pa.Table, schema: FeatureSchema) -> np.ndarray:
    """[N] index k of the condition matching each row's request context (the most specific one), -1 when none.

    The condition named `request` (the embedding job's query under each row's own context) matches every row.

    A condition such as `surface=home|device=mobile` matches a row when every pair equals the row's column. Only
    feature columns (request context, item category) are compared, so a condition on a post-event column never
    lets that column in through the back door.
    """
    allowed = set(schema.context_columns) | {schema.category}
    best = np.full(table.num_rows, -1, dtype=np.int64)
    best_size = np.zeros(table.num_rows, dtype=np.int64)
    names = list(schema.lum_conditions.values())
    if REQUEST_CONDITION in names:  # the embedding job already asked each row's own context: it matches every row
        return np.full(table.num_rows, names.index(REQUEST_CONDITION), dtype=np.int64)
    for k, name in enumerate(names):
        pairs = parse_condition(name)
        if not set(pairs) <= allowed or not set(pairs) <= set(table.column_names):
            continue
        match = np.ones(table.num_rows, dtype=bool)
        for column, value in pairs.items():
            match &= pc.equal(_strings(table.column(column)), value).fill_null(False).to_numpy(zero_copy_only=False)
        better = match & (len(pairs) > best_size)
        best[better], best_size[better] = k, len(pairs)
    return best


def lum_features(table: pa.Table, schema: FeatureSchema) -> LumFeatures:
    dim = int(schema.lum_dim or 0)
    if dim <= 0:
        raise RankerInputError("the training set's metadata gives no lum_dim: rebuild it after `lum features ingest`")
    users = np.stack([_vectors(table.column(LUM_USER_PREFIX + s), dim, LUM_USER_PREFIX + s) for s in schema.lum_conditions], axis=1)
    item = _vectors(table.column(LUM_ITEM_COLUMN), dim, LUM_ITEM_COLUMN)
    sims = np.einsum("nkd,nd->nk", users, item)  # NaN wherever either vector is missing
    which = request_condition(table, schema)
    rows = np.arange(table.num_rows)

    def at_request(per_condition: np.ndarray) -> np.ndarray:
        """[N, K] -> [N]: each row's value under its request condition, NaN where none matches."""
        return np.where(which >= 0, per_condition[rows, np.maximum(which, 0)], np.nan).astype(np.float32)

    with np.errstate(invalid="ignore", divide="ignore"):
        norms = np.linalg.norm(users, axis=2) * np.linalg.norm(item, axis=1)[:, None]
        cosines = (sims / np.where(norms > 0, norms, np.nan)).astype(np.float32)
    sim_request, cos_request = at_request(sims), at_request(cosines)
    missing = (np.isnan(users).any(axis=(1, 2)) | np.isnan(item).any(axis=1)).astype(np.float32)
    return LumFeatures(users, item, sims.astype(np.float32), sim_request, cosines, cos_request,
                       np.isnan(sim_request).astype(np.float32), missing)


# Per-candidate counters compared within a request (the user's counters are the same for every candidate)
REQUEST_COUNTERS = ITEM_COUNTERS
REQUEST_STATS = ("vs_request_mean", "vs_request_max", "request_rank")


def request_groups(table: pa.Table, schema: FeatureSchema) -> np.ndarray:
    """[N] int64 request number of every row: the rows that share the user and the request time are one request's
    candidates (a slate is scored at one moment for one user)."""
    for column in (schema.user, schema.time):
        if column not in table.column_names:
            raise RankerInputError(f"request features need column '{column}' to tell which rows are one request's candidates")
    users = _strings(table.column(schema.user))
    times = pc.cast(table.column(schema.time), pa.int64())
    if table.num_rows and users.null_count == 0 and times.null_count == 0 and \
            pc.count_distinct(users).as_py() == 1 and pc.count_distinct(times).as_py() == 1:
        return np.zeros(table.num_rows, dtype=np.int64)  # one request (the ranking service's case): no groupby needed
    keys = pd.DataFrame({"user": users.to_numpy(zero_copy_only=False), "time": times.to_numpy(zero_copy_only=False)})
    return keys.groupby(["user", "time"], sort=False, dropna=False).ngroup().to_numpy().astype(np.int64)


def relative_to_request(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[N, F] per-candidate values -> [N, 3F]: value minus its request's mean, minus its request's max, and its
    rank within the request (1 = highest; ties share the average rank). NaN stays NaN and is left out of the
    request's mean and max. Only the row's own request is read: no other request, and no label."""
    if len(groups) and (groups == groups[0]).all():  # one request: the same numbers with numpy, without pandas' groupby
        return _relative_to_one_request(values)
    frame = pd.DataFrame(values.astype(np.float64, copy=False))
    by_request = frame.groupby(groups, sort=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, top = by_request.transform("mean").to_numpy(), by_request.transform("max").to_numpy()
        rank = by_request.rank(ascending=False, method="average").to_numpy()
    return np.concatenate([values - mean, values - top, rank], axis=1).astype(np.float32)


def _relative_to_one_request(values: np.ndarray) -> np.ndarray:
    """`relative_to_request` when every row is one request's (pandas' mean/max skip NaN; its average rank is
    scipy's `rankdata` of the negated values over the non-NaN rows)."""
    from scipy.stats import rankdata

    x = values.astype(np.float64, copy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column that is NaN on every row: NaN, as pandas gives
        mean, top = np.nanmean(x, axis=0, keepdims=True), np.nanmax(x, axis=0, keepdims=True)
    rank = np.full_like(x, np.nan)
    for j in range(x.shape[1]):
        present = ~np.isnan(x[:, j])
        rank[present, j] = rankdata(-x[present, j], method="average")
    return np.concatenate([values - mean, values - top, rank], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class _DenseBlock:
    """Some of a ranker's dense columns (FeaturePipeline._dense_blocks): values [N, W] ([N] for one column), each
    column's name as parts, and the kind of value ("counter", "flag", "request" or "" for none).

    The two models name a column from the same parts: LightGBM joins them with "__" (`lum_user__home__0`), DLRM
    with ":" after the kind (`lum_user:home:0`, `counter:item_ctr`, `flag:missing_lum`); DLRM standardises every
    kind but "flag".
    """

    values: np.ndarray
    names: list[tuple[str, ...]]
    kind: str = ""

    def columns(self) -> np.ndarray:
        """[N, W] float32."""
        values = self.values.astype(np.float32, copy=False)
        return values[:, None] if values.ndim == 1 else values

    def lightgbm_names(self) -> list[str]:
        return ["__".join(parts) for parts in self.names]

    def dlrm_names(self) -> list[str]:
        return [":".join((self.kind, *parts) if self.kind else parts) for parts in self.names]


@dataclass(frozen=True)
class SparseFeature:
    key: str  # KeyedJaggedTensor key (the column name, unless `column` says otherwise)
    table: str | None  # vocabulary and embedding table it reads (None: the age buckets, ids without a vocabulary)
    sequence: bool  # multi-valued (a history) or one id per row
    positional: bool = False  # looked up per position (an EmbeddingCollection: the din variants), not pooled
    column: str | None = None  # the training-set column it reads when not `key`

    @property
    def source(self) -> str:
        return self.column or self.key


@dataclass
class DLRMInputs:
    """DLRM inputs of N rows: dense [N, F_dense], one id array per sparse key, labels [N] (None when scoring)."""

    dense: torch.Tensor  # [N, F_dense] float32
    keys: list[str]
    ids: list[np.ndarray]  # per key: [N] ids (single-valued) or the flat ids of all rows (sequence)
    offsets: list[np.ndarray | None]  # per key: None (single-valued) or [N + 1] offsets into ids
    labels: torch.Tensor | None  # [N] float32
    # [N] int64 request number of every row (`request_groups`), for the DLRM's listwise loss; None when not needed
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def batch(self, rows: np.ndarray | None = None) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor | None]:
        """(dense [B, F_dense], KJT with B rows per key, labels [B]) for `rows` (None: all rows, in order)."""
        values, lengths = [], []
        for ids, offsets in zip(self.ids, self.offsets):
            if offsets is None:
                picked = ids if rows is None else ids[rows]
                values.append(picked)
                lengths.append(np.ones(len(picked), dtype=np.int64))
            elif rows is None:
                values.append(ids)
                lengths.append(np.diff(offsets))
            else:
                count = offsets[rows + 1] - offsets[rows]
                ends = np.cumsum(count)
                values.append(ids[np.repeat(offsets[rows] - (ends - count), count) + np.arange(ends[-1] if len(ends) else 0)])
                lengths.append(count)
        kjt = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        if rows is None:
            return self.dense, kjt, self.labels
        index = torch.from_numpy(rows)
        return self.dense[index], kjt, None if self.labels is None else self.labels[index]


class FeaturePipeline:
    """Vocabularies and dense statistics fitted on training rows; turns any table of the schema into inputs."""

    def __init__(
        self,
        schema: FeatureSchema,
        variant: str,
        config: FeatureConfig,
        vocabularies: dict[str, Vocabulary],
        dense_names: list[str],
        dense_mean: np.ndarray,
        dense_std: np.ndarray,
        item_factors: ItemFactors | None = None,
        lm_item_vectors: ItemFactors | None = None,
    ):
        self.schema, self.variant, self.config = schema, variant, config
        self.item_factors = item_factors  # the din variants' LightGBM similarities
        self.lm_item_vectors = lm_item_vectors  # din+lum: the LM's unit item vectors, for the behaviours' similarities
        self.use_lum, self.use_history = variant_parts(variant)
        self.vocabularies = vocabularies
        self.dense_names = dense_names
        self.dense_mean = np.asarray(dense_mean, dtype=np.float32)
        self.dense_std = np.asarray(dense_std, dtype=np.float32)

    # ---- fitting and saving

    @classmethod
    def fit(cls, table: pa.Table, schema: FeatureSchema, variant: str, config: FeatureConfig = FeatureConfig()) -> FeaturePipeline:
        """Vocabularies and dense statistics from the training rows `table`."""
        return cls._fit(table, schema, variant, config)[0]

    @classmethod
    def fit_dlrm(
        cls, table: pa.Table, schema: FeatureSchema, variant: str, config: FeatureConfig = FeatureConfig(), with_groups: bool = False
    ) -> tuple[FeaturePipeline, DLRMInputs]:
        """`fit`, and the DLRM inputs of the same rows, made from the dense block the statistics came from (with LUM
        and request features that block is the costly part: computed once, not twice)."""
        pipeline, raw = cls._fit(table, schema, variant, config)
        return pipeline, pipeline.dlrm_inputs(table, raw_dense=raw, with_groups=with_groups)

    @classmethod
    def _fit(cls, table: pa.Table, schema: FeatureSchema, variant: str, config: FeatureConfig) -> tuple[FeaturePipeline, np.ndarray]:
        """(the fitted pipeline, [N, F_dense] the rows' dense block before standardisation)."""
        pipeline = cls(schema, variant, config, {}, [], np.zeros(0), np.ones(0))
        for feature in pipeline._vocabulary_features:
            if feature.table in pipeline.vocabularies:
                continue
            arrays = [_strings(table.column(feature.table))]
            history = {schema.item: HISTORY_ITEMS, schema.category: HISTORY_CATEGORIES}.get(feature.table)
            if pipeline.use_history and history is not None:
                # items seen only in histories still get rows: they are trained through the pooled feature
                arrays.append(_lists(table.column(history))[0])
            pipeline.vocabularies[feature.table] = Vocabulary.fit(arrays, config.min_count, config.max_vocab)
        if pipeline.use_attention:
            pipeline.item_factors = ItemFactors.fit(table, schema)
            if pipeline.use_lum and config.din_lm_similarity:
                pipeline.lm_item_vectors = ItemFactors.from_lm_items(table, schema)
        raw, names, scaled = pipeline._raw_dense(table)
        # a column may be missing on every row (lum_sim_request where no condition matches the request context, as
        # on MovieLens): it scales with mean 0 and std 1, without numpy's "mean of empty slice" warning
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.where(scaled, np.nan_to_num(np.nanmean(raw, axis=0)), 0.0)
            std = np.where(scaled, np.nan_to_num(np.nanstd(raw, axis=0)), 1.0)
        pipeline.dense_names, pipeline.dense_mean, pipeline.dense_std = names, mean, np.where(std > 1e-6, std, 1.0)
        return pipeline, raw

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "config": asdict(self.config),
            "vocabularies": {name: v.values for name, v in self.vocabularies.items()},
            "dense_names": self.dense_names,
            "dense_mean": self.dense_mean.tolist(),
            "dense_std": self.dense_std.tolist(),
            **({"item_factors": self.item_factors.to_json()} if self.item_factors is not None else {}),
            **({"lm_item_vectors": self.lm_item_vectors.to_json()} if self.lm_item_vectors is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], schema: FeatureSchema) -> FeaturePipeline:
        return cls(
            schema,
            data["variant"],
            FeatureConfig(**data["config"]),
            {name: Vocabulary(values) for name, values in data["vocabularies"].items()},
            data["dense_names"],
            np.asarray(data["dense_mean"]),
            np.asarray(data["dense_std"]),
            ItemFactors.from_json(data["item_factors"]) if "item_factors" in data else None,
            ItemFactors.from_json(data["lm_item_vectors"]) if "lm_item_vectors" in data else None,
        )

    # ---- what the model sees

    @property
    def use_attention(self) -> bool:
        return variant_attention(self.variant)

    @property
    def sparse_features(self) -> list[SparseFeature]:
        """The DLRM's KJT keys, in order: every categorical column (without the raw user and item ids unless
        `dlrm_ids`), then with pooled history the two history keys, or with target attention the
        EmbeddingCollection's keys (target item, history items, target category, history categories) and the
        behaviours' age buckets (what `ranker.din.DINDLRM` splits its input by)."""
        ids = () if self.config.dlrm_ids else (self.schema.user, self.schema.item)
        features = [f for f in self._vocabulary_features if f.sequence or f.key not in ids]
        if not self.use_attention:
            return features
        schema = self.schema
        return [f for f in features if not f.sequence] + [
            SparseFeature(TARGET_ITEM_KEY, schema.item, False, True, schema.item),
            SparseFeature(HISTORY_ITEMS, schema.item, True, True),
            SparseFeature(TARGET_CATEGORY_KEY, schema.category, False, True, schema.category),
            SparseFeature(HISTORY_CATEGORIES, schema.category, True, True),
            SparseFeature(AGE_KEY, None, True, True, HISTORY_TIMES),
        ]

    @property
    def _vocabulary_features(self) -> list[SparseFeature]:
        """Every categorical input of either model; each one's table gets a vocabulary."""
        features = [SparseFeature(c, c, False) for c in self.schema.categorical_columns]
        if self.use_history:
            features += [SparseFeature(HISTORY_ITEMS, self.schema.item, True), SparseFeature(HISTORY_CATEGORIES, self.schema.category, True)]
        return features

    def embedding_tables(self, dim: int) -> list[EmbeddingBagConfig | EmbeddingConfig]:
        """One table per vocabulary; a history key joins its target's table. MEAN pooling: the history becomes
        the average of its items' vectors (for a single id MEAN is that id's vector). With target attention the
        per-position keys get EmbeddingConfigs (an EmbeddingCollection's tables, `s_<name>`) after the bags."""
        bags: dict[str, list[str]] = {}
        positions: dict[str, list[str]] = {}
        for feature in self.sparse_features:
            if feature.table is not None:
                (positions if feature.positional else bags).setdefault(feature.table, []).append(feature.key)
        tables: list[EmbeddingBagConfig | EmbeddingConfig] = [
            EmbeddingBagConfig(
                name=f"t_{name}",
                embedding_dim=dim,
                num_embeddings=self.vocabularies[name].num_embeddings,
                feature_names=keys,
                pooling=PoolingType.MEAN,
            )
            for name, keys in bags.items()
        ]
        tables += [
            EmbeddingConfig(name=f"s_{name}", embedding_dim=dim, num_embeddings=self.vocabularies[name].num_embeddings, feature_names=keys)
            for name, keys in positions.items()
        ]
        return tables

    @property
    def lightgbm_categorical(self) -> list[str]:
        """The categorical columns LightGBM gets (integer codes): the schema's, without the ids unless asked."""
        ids = () if self.config.lightgbm_ids else (self.schema.user, self.schema.item)
        return [c for c in self.schema.categorical_columns if c not in ids]

    # ---- building inputs

    def dlrm_inputs(
        self, table: pa.Table, with_labels: bool = True, raw_dense: np.ndarray | None = None, with_groups: bool = False
    ) -> DLRMInputs:
        """The model inputs of `table`'s rows; `raw_dense`: their dense block before standardisation when the
        caller has it already (`fit_dlrm`); `with_groups`: also each row's request number (the listwise loss)."""
        keys, ids, offsets = [], [], []
        for feature in self.sparse_features:
            keys.append(feature.key)
            if feature.table is None:  # the behaviours' age buckets
                buckets, row_offsets = self._history_ages(table)
                ids.append(buckets)
                offsets.append(row_offsets)
            elif feature.sequence:
                values, row_offsets = _lists(table.column(feature.source))
                positions, row_offsets = _last(row_offsets, self.config.history_len)
                ids.append(self.vocabularies[feature.table].ids(values.take(pa.array(positions))))
                offsets.append(row_offsets)
            else:
                ids.append(self.vocabularies[feature.table].ids(table.column(feature.source)))
                offsets.append(None)
        raw = self._raw_dense(table)[0] if raw_dense is None else raw_dense
        dense = np.nan_to_num((raw - self.dense_mean) / self.dense_std, nan=0.0, posinf=0.0, neginf=0.0)
        labels = None
        if with_labels and self.schema.label in table.column_names:
            labels = torch.from_numpy(_numbers(table.column(self.schema.label)).astype(np.float32))
        groups = request_groups(table, self.schema) if with_groups else None
        return DLRMInputs(torch.from_numpy(dense.astype(np.float32, copy=False)), keys, ids, offsets, labels, groups)

    def lightgbm_inputs(self, table: pa.Table) -> tuple[np.ndarray, list[str]]:
        """([N, F] float32 with NaN for missing, feature names); the categorical ones are `lightgbm_categorical`."""
        blocks = self._dense_blocks(table, "lightgbm")
        return np.concatenate([block.columns() for block in blocks], axis=1), [name for block in blocks for name in block.lightgbm_names()]

    # ---- pieces

    def _flags(self, table: pa.Table) -> np.ndarray:
        """[N, 2] the counter flags (a null flag counts as missing)."""
        return np.stack([np.nan_to_num(_numbers(table.column(c)), nan=1.0) for c in FLAG_COLUMNS], axis=1)

    def _history_numbers(self, table: pa.Table) -> np.ndarray:
        """[N, 3] history length, share of its items in the target's category, whether the target item is in it."""
        out = []
        for column, target in ((HISTORY_CATEGORIES, self.schema.category), (HISTORY_ITEMS, self.schema.item)):
            values, offsets = _lists(table.column(column))
            positions, offsets = _last(offsets, self.config.history_len)
            lengths = np.diff(offsets)
            parent = np.repeat(np.arange(table.num_rows), lengths)
            same = pc.equal(_strings(values.take(pa.array(positions))), _strings(table.column(target)).take(pa.array(parent)))
            hits = np.bincount(parent, weights=same.fill_null(False).to_numpy(zero_copy_only=False), minlength=table.num_rows)
            out.append((lengths, hits))
        (lengths, in_category), (_, has_item) = out
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(lengths > 0, in_category / np.maximum(lengths, 1), np.nan)
        return np.stack([lengths.astype(np.float64), share, (has_item > 0).astype(np.float64)], axis=1)

    def _history_hours(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(hours [nnz] between each of the last `history_len` behaviours and its row's request time, offsets [N + 1]),
        aligned with the last `history_len` entries of `hist_item_ids`."""
        times, offsets = _lists(table.column(HISTORY_TIMES))
        item_offsets = _lists(table.column(HISTORY_ITEMS))[1]
        if not np.array_equal(offsets, item_offsets):
            row = int(np.flatnonzero(np.diff(offsets) != np.diff(item_offsets))[0])
            raise RankerInputError(
                f"row {row}: '{HISTORY_TIMES}' holds {int(offsets[row + 1] - offsets[row])} times but '{HISTORY_ITEMS}' "
                f"{int(item_offsets[row + 1] - item_offsets[row])} items; they must be aligned (one time per history item)")
        positions, offsets = _last(offsets, self.config.history_len)
        seconds = pc.cast(times, pa.float64()).to_numpy(zero_copy_only=False)[positions] if len(positions) else np.zeros(0)
        request = pc.cast(pc.cast(table.column(self.schema.time), pa.timestamp("us", tz="UTC")), pa.int64())
        request_s = request.to_numpy(zero_copy_only=False).astype(np.float64) / 1e6
        parent = np.repeat(np.arange(table.num_rows), np.diff(offsets))
        return (request_s[parent] - seconds) / 3600.0, offsets

    def _history_ages(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(age bucket ids [nnz] of the last `history_len` behaviours, offsets [N + 1]): the `hist_age` key."""
        hours, offsets = self._history_hours(table)
        return age_buckets(hours), offsets

    def _target_aware_history(self, table: pa.Table) -> tuple[np.ndarray, list[str]]:
        """([N, 7], names): what a tree can use of the history's relevance to the candidate (LightGBM, din variants).

        din_sim_max / din_sim_mean / din_sim_last5: cosine between the target's and each behaviour's item factors
        (NaN where either has none); din_category_count: behaviours in the target's category; din_hours_since_category
        and din_hours_since_item: hours since the newest behaviour in the target's category / on the target item
        (NaN: never); din_category_share_last5: the share of the last 5 behaviours in the target's category.
        """
        n = table.num_rows
        item_values, offsets = _lists(table.column(HISTORY_ITEMS))
        positions, offsets = _last(offsets, self.config.history_len)
        lengths = np.diff(offsets)
        parent = np.repeat(np.arange(n), lengths)
        from_end = np.repeat(offsets[1:], lengths) - np.arange(offsets[-1]) - 1  # 0 = the newest behaviour
        hours = self._history_hours(table)[0]
        history_items = _strings(item_values.take(pa.array(positions)))
        cat_values, cat_offsets = _lists(table.column(HISTORY_CATEGORIES))
        history_categories = _strings(cat_values.take(pa.array(_last(cat_offsets, self.config.history_len)[0])))
        target_items = _strings(table.column(self.schema.item)).take(pa.array(parent))
        target_categories = _strings(table.column(self.schema.category)).take(pa.array(parent))
        same_item = pc.equal(history_items, target_items).fill_null(False).to_numpy(zero_copy_only=False)
        same_category = pc.equal(history_categories, target_categories).fill_null(False).to_numpy(zero_copy_only=False)

        def newest(mask: np.ndarray) -> np.ndarray:
            """[N] hours since the newest behaviour where `mask`, NaN when none."""
            out = np.full(n, np.inf)
            np.minimum.at(out, parent[mask], hours[mask])
            return np.where(np.isinf(out), np.nan, out)

        def per_row(values: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
            """[N] max or mean of `values` over each row's behaviours where `mask` (NaN when none)."""
            keep = mask & ~np.isnan(values)
            count = np.bincount(parent[keep], minlength=n).astype(np.float64)
            if how == "mean":
                total = np.bincount(parent[keep], weights=values[keep], minlength=n)
                return np.where(count > 0, total / np.maximum(count, 1), np.nan)
            out = np.full(n, -np.inf)
            np.maximum.at(out, parent[keep], values[keep])
            return np.where(count > 0, out, np.nan)

        factors = self.item_factors
        target_vectors = factors.vectors(_strings(table.column(self.schema.item)))  # [N, k]
        history_vectors = factors.vectors(history_items)  # [nnz, k]
        sims = np.einsum("ij,ij->i", history_vectors, target_vectors[parent]) if len(parent) else np.zeros(0)
        everywhere, recent = np.ones(len(parent), dtype=bool), from_end < 5
        recent_count = np.bincount(parent[recent], minlength=n).astype(np.float64)
        recent_same = np.bincount(parent[recent], weights=same_category[recent].astype(np.float64), minlength=n)
        block = np.stack([
            per_row(sims, everywhere, "max"),
            per_row(sims, everywhere, "mean"),
            per_row(sims, recent, "mean"),
            np.bincount(parent, weights=same_category.astype(np.float64), minlength=n),
            newest(same_category),
            newest(same_item),
            np.where(recent_count > 0, recent_same / np.maximum(recent_count, 1), np.nan),
        ], axis=1)
        if self.lm_item_vectors is None:
            return block, list(TARGET_AWARE_NAMES)
        # din+lum: the same similarities with the LM's own item vectors (the target's from its row, the behaviours'
        # from the table the fitting rows' targets gave); a behaviour the table lacks counts as missing
        target_lm = _vectors(table.column(LUM_ITEM_COLUMN), int(self.schema.lum_dim or 0), LUM_ITEM_COLUMN)
        with np.errstate(invalid="ignore", divide="ignore"):
            target_lm = target_lm / np.linalg.norm(target_lm, axis=1, keepdims=True)
        lm_sims = np.einsum("ij,ij->i", self.lm_item_vectors.vectors(history_items), target_lm[parent]) if len(parent) else np.zeros(0)
        lm_block = np.stack([per_row(lm_sims, everywhere, "max"), per_row(lm_sims, everywhere, "mean"), per_row(lm_sims, recent, "mean")], axis=1)
        return np.concatenate([block, lm_block], axis=1), [*TARGET_AWARE_NAMES, *LM_TARGET_AWARE_NAMES]

    def _raw_dense(self, table: pa.Table) -> tuple[np.ndarray, list[str], np.ndarray]:
        """([N, F_dense] float32 before standardisation, names, which columns get standardised)."""
        blocks = self._dense_blocks(table, "dlrm")
        names = [name for block in blocks for name in block.dlrm_names()]
        scaled = [block.kind != "flag" for block in blocks for _ in block.names]  # a 0/1 flag stays as it is
        return np.concatenate([block.columns() for block in blocks], axis=1), names, np.asarray(scaled)

    def _dense_blocks(self, table: pa.Table, model: str) -> list[_DenseBlock]:
        """The dense inputs of `model` ("dlrm" | "lightgbm") in their order: the one definition of both layouts.

        Sections: [LightGBM: categorical codes], counters, counter flags, history, [LightGBM din: target-aware
        history], LUM, request features. Where the models differ it is said here: LightGBM takes raw values with
        NaN for missing (it routes missing values itself), the MLP a signed log of the counters and explicit flags.
        """
        schema = self.schema
        lightgbm = model == "lightgbm"
        blocks: list[_DenseBlock] = []
        if lightgbm:  # DLRM embeds these (its sparse features)
            categorical = self.lightgbm_categorical
            codes = np.stack([self.vocabularies[c].ids(table.column(c)) for c in categorical], axis=1).astype(np.float32)
            blocks.append(_DenseBlock(codes, [(c,) for c in categorical]))
        if schema.counter_columns:
            counters = np.stack([_numbers(table.column(c)) for c in schema.counter_columns], axis=1)
            values = counters if lightgbm else np.sign(counters) * np.log1p(np.abs(counters))
            blocks.append(_DenseBlock(values, [(c,) for c in schema.counter_columns], "counter"))
        blocks.append(_DenseBlock(self._flags(table), [(c,) for c in FLAG_COLUMNS], "flag"))
        if self.use_history:
            if lightgbm:
                blocks.append(_DenseBlock(self._history_numbers(table), [("hist_len",), ("hist_share_in_category",), ("hist_has_item",)]))
            else:  # the MLP pools the history's items itself (sparse features): only the length here
                lengths = np.minimum(np.diff(_lists(table.column(HISTORY_ITEMS))[1]), self.config.history_len)
                blocks.append(_DenseBlock(np.log1p(lengths.astype(np.float64)), [("hist_len",)]))
        if lightgbm and self.use_attention:  # DLRM attends over the behaviours (ranker/din.py)
            block, block_names = self._target_aware_history(table)
            blocks.append(_DenseBlock(block, [(n,) for n in block_names]))
        lum = None
        if self.use_lum:
            lum = lum_features(table, schema)
            n, k, d = lum.users.shape
            slugs = schema.lum_conditions
            if self.config.lum_inputs == "vectors":
                blocks.append(_DenseBlock(lum.users.reshape(n, k * d), [("lum_user", s, str(j)) for s in slugs for j in range(d)]))
                blocks.append(_DenseBlock(lum.item, [("lum_item", str(j)) for j in range(d)]))
            blocks.append(_DenseBlock(lum.sims, [("lum_sim", s) for s in slugs]))
            blocks.append(_DenseBlock(lum.cosines, [("lum_cos", s) for s in slugs]))
            blocks.append(_DenseBlock(lum.sim_request, [("lum_sim_request",)]))
            blocks.append(_DenseBlock(lum.cos_request, [("lum_cos_request",)]))
            if not lightgbm:  # LightGBM reads the request similarity's NaN itself
                blocks.append(_DenseBlock(lum.request_missing, [("lum_sim_request_missing",)], "flag"))
            blocks.append(_DenseBlock(lum.missing, [("missing_lum",)], "flag"))
        if self.config.request_features:
            block, block_names = self._request_relative(table, lum)
            blocks.append(_DenseBlock(block, [(n,) for n in block_names], "request"))
        return blocks

    def _request_relative(self, table: pa.Table, lum: LumFeatures | None) -> tuple[np.ndarray, list[str]]:
        """([N, 3F], names): the item counters (counts as log1p) and, with LUM, the K + 1 similarities and cosines,
        each relative to the other candidates of its request (`relative_to_request`)."""
        columns, names = [], []
        for c in REQUEST_COUNTERS:
            if c in self.schema.counter_columns:
                values = _numbers(table.column(c))
                columns.append(values if c.endswith("ctr") else np.log1p(np.maximum(values, 0.0)))
                names.append(c)
        if lum is not None:
            slugs = list(self.schema.lum_conditions)
            columns += [*lum.sims.T, *lum.cosines.T, lum.sim_request, lum.cos_request]
            names += [f"lum_sim__{s}" for s in slugs] + [f"lum_cos__{s}" for s in slugs] + ["lum_sim_request", "lum_cos_request"]
        if not columns:
            return np.zeros((table.num_rows, 0), dtype=np.float32), []
        block = relative_to_request(np.stack(columns, axis=1), request_groups(table, self.schema))
        return block, [f"{n}__{stat}" for stat in REQUEST_STATS for n in names]
