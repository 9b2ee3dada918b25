"""Semantic IDs for items: content vectors -> residual k-means codes (in the style of TIGER, PLUM and OneRec).

An item's semantic ID is a short tuple of codes (c_0, ..., c_{L-1}) plus a tie-break k. Level 0 clusters the items'
content vectors; level l clusters what the levels before it left unexplained (the residual), so similar items share
code prefixes and a brand-new item gets codes from its content alone. Items whose L codes coincide are told apart
by the tie-break (0 for the first such item in row order, 1 for the next, ...).

Two steps, each with a state that round-trips through `to_state` / `from_state` (numeric numpy arrays plus
JSON-able values only, so a caller can persist it as an `.npz` beside a JSON file, without pickle):

1. `build_content_vectors(items, ContentFeatureConfig)` -> float32 [N, D] unit rows and a fitted `ContentEncoder`
   whose `transform` embeds new items the same way. Blocks: text (TF-IDF word uni+bigrams -> truncated SVD),
   categoricals (multi-hot, values may be `|`-separated), numerics (standardised), a user-supplied vector column
   (standardised per dimension). Each block is scaled to weigh about the same, then the row is L2-normalised.
2. `ResidualQuantizer(ResidualKMeansConfig).fit(vectors)` -> `encode` [M, L] codes, `decode` back to [M, D].

`assign_tiebreak` and `code_report` finish the IDs and summarise their quality (codebook usage, collisions).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer

STATE_FORMAT = 1
MULTI_VALUE_SEPARATOR = "|"
_NEEDS = "the semantic tokenizer needs"


# ====================================================================== content vectors
@dataclass(frozen=True)
class ContentFeatureConfig:
    """Which item columns describe an item's content, and how to embed them."""

    text_columns: tuple[str, ...] = ()  # free text; joined into one document per item
    categorical_columns: tuple[str, ...] = ()  # values may be multi-valued: "Action|Comedy"
    numeric_columns: tuple[str, ...] = ()
    vector_column: str | None = None  # a list<float> column of equal-length vectors, supplied by the user
    text_dim: int = 32  # upper bound on the SVD dimension of the text block
    seed: int = 0

    def __post_init__(self) -> None:
        # tuples, so a config built from lists (e.g. parsed JSON) stays hashable and compares equal
        for name in ("text_columns", "categorical_columns", "numeric_columns"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.text_dim < 1:
            raise ValueError(f"text_dim must be at least 1, got {self.text_dim}")

    @property
    def columns(self) -> list[str]:
        """Every configured column, in block order."""
        vector = [self.vector_column] if self.vector_column else []
        return [*self.text_columns, *self.categorical_columns, *self.numeric_columns, *vector]


def _text_analyzer() -> Any:
    """The tokenizer+n-gram function of the text block. Its parameters are constants, so an encoder rebuilt from
    state analyses text exactly as the fitted one did."""
    return TfidfVectorizer(ngram_range=(1, 2), min_df=1).build_analyzer()


def _documents(items: pd.DataFrame, columns: tuple[str, ...]) -> list[str]:
    """One document per item: its non-null text columns joined by spaces. Returns N strings."""
    parts = [items[c].astype(object).where(items[c].notna(), "").astype(str) for c in columns]
    joined = parts[0]
    for part in parts[1:]:
        joined = joined + " " + part
    return joined.tolist()


def _split_values(value: Any) -> list[str]:
    """The categorical values of one cell: a `|`-separated string, a list-like, a scalar or null."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return []
    return [v.strip() for v in str(value).split(MULTI_VALUE_SEPARATOR) if v.strip()]


def _numeric_matrix(items: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    """The numeric columns as float64 [N, n_columns], nulls as NaN."""
    out = np.empty((len(items), len(columns)), dtype=np.float64)
    for j, column in enumerate(columns):
        try:
            out[:, j] = pd.to_numeric(items[column], errors="raise").astype("float64").to_numpy(na_value=np.nan)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"numeric column '{column}' holds non-numeric values ({err}); {_NEEDS} numbers (or nulls) there"
            ) from err
    return out


def _vector_matrix(items: pd.DataFrame, column: str, expected_dim: int | None) -> np.ndarray:
    """The vector column as float64 [N, d]; every row must be a non-null, finite vector of one common length."""
    rows: list[np.ndarray] = []
    for position, value in enumerate(items[column].tolist()):
        if value is None or (np.isscalar(value) and pd.isna(value)):
            raise ValueError(
                f"vector column '{column}' is null in row {position}; {_NEEDS} a vector for every item"
            )
        row = np.asarray(value, dtype=np.float64)
        if row.ndim != 1:
            raise ValueError(f"vector column '{column}' row {position} is not a flat list of numbers; {_NEEDS} one")
        rows.append(row)
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise ValueError(
            f"vector column '{column}' has rows of different lengths {lengths}; {_NEEDS} vectors of one length"
        )
    if expected_dim is not None and lengths and lengths[0] != expected_dim:
        raise ValueError(
            f"vector column '{column}' has length {lengths[0]} but the encoder was fitted on length {expected_dim}; "
            f"{_NEEDS} vectors of the fitted length"
        )
    matrix = np.stack(rows) if rows else np.zeros((0, expected_dim or 0))
    if not np.isfinite(matrix).all():
        raise ValueError(f"vector column '{column}' holds NaN or infinite values; {_NEEDS} finite vectors")
    return matrix


def _fit_standardiser(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of [N, d] (NaNs ignored); a constant or all-null column gets std 1, so it maps to
    0 instead of dividing by zero."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": handled just below
        mean = np.nanmean(matrix, axis=0) if len(matrix) else np.zeros(matrix.shape[1])
        std = np.nanstd(matrix, axis=0) if len(matrix) else np.ones(matrix.shape[1])
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    return mean.astype(np.float64), std.astype(np.float64)


def _tfidf(documents: list[str], ngram_index: dict[str, int], idf: np.ndarray) -> sparse.csr_matrix:
    """TF-IDF [M, V] of documents over a fitted vocabulary (n-gram -> column) and idf [V]: raw counts x idf, rows
    L2-normalised - what scikit-learn's TfidfVectorizer computes with its defaults, done here so an encoder rebuilt
    from state needs no fitted scikit-learn object."""
    analyze = _text_analyzer()
    indptr, indices, data = [0], [], []
    for document in documents:
        counts = Counter(ngram_index[g] for g in analyze(document) if g in ngram_index)
        indices.extend(counts.keys())
        data.extend(counts.values())
        indptr.append(len(indices))
    matrix = sparse.csr_matrix(
        (np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), np.asarray(indptr, dtype=np.int64)),
        shape=(len(documents), len(idf)),
    )
    matrix = sparse.csr_matrix(matrix.multiply(idf[None, :]))
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sparse.csr_matrix(sparse.diags(inverse) @ matrix)


def _l2_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows of [N, d] scaled to unit L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def _check_items(items: Any, config: ContentFeatureConfig) -> pd.DataFrame:
    """The items table as a DataFrame, after the checks every fit and transform needs."""
    if hasattr(items, "to_pandas") and not isinstance(items, pd.DataFrame):
        items = items.to_pandas()  # a pyarrow Table
    if not config.columns:
        raise ValueError(
            "no content columns configured (text_columns, categorical_columns, numeric_columns, vector_column are "
            f"all empty); {_NEEDS} at least one column describing the items"
        )
    missing = [c for c in config.columns if c not in items.columns]
    if missing:
        raise ValueError(
            f"content column(s) {missing} not in the items table (available columns: {list(items.columns)}); "
            f"{_NEEDS} every configured column"
        )
    if len(items) == 0:
        raise ValueError(
            f"the items table has zero rows; {_NEEDS} at least one item with content columns {config.columns}"
        )
    return items


class ContentEncoder:
    """Turns item content into float32 [N, D] unit vectors. Fitted by `build_content_vectors` (or `fit`); `transform`
    embeds any items table with the configured columns, new items included. Fitted parameters:

    - text: `text_vocabulary` (V n-grams), `text_idf` [V], `text_components` [k, V] (the SVD basis)
    - categorical: `categorical_values[j]`, the values column j had at fit (unseen values are ignored later)
    - numeric: `numeric_mean`, `numeric_std` [n_numeric]; vector: `vector_mean`, `vector_std` [d]
    """

    def __init__(
        self,
        config: ContentFeatureConfig,
        text_vocabulary: list[str],
        text_idf: np.ndarray,
        text_components: np.ndarray,
        categorical_values: list[list[str]],
        numeric_mean: np.ndarray,
        numeric_std: np.ndarray,
        vector_mean: np.ndarray,
        vector_std: np.ndarray,
    ) -> None:
        self.config = config
        self.text_vocabulary = list(text_vocabulary)
        self.text_idf = np.asarray(text_idf, dtype=np.float64)
        components = np.asarray(text_components, dtype=np.float64)
        # no text block: keep a [0, V] basis even when the state stored a flattened empty array
        self.text_components = components if components.size else np.zeros((0, len(self.text_vocabulary)))
        self.categorical_values = [list(v) for v in categorical_values]
        self.numeric_mean = np.asarray(numeric_mean, dtype=np.float64)
        self.numeric_std = np.asarray(numeric_std, dtype=np.float64)
        self.vector_mean = np.asarray(vector_mean, dtype=np.float64)
        self.vector_std = np.asarray(vector_std, dtype=np.float64)
        self._ngram_index = {g: i for i, g in enumerate(self.text_vocabulary)}
        self._category_index = [{v: i for i, v in enumerate(values)} for values in self.categorical_values]

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, items: pd.DataFrame, config: ContentFeatureConfig) -> ContentEncoder:
        """Fits every configured block on the items table [N rows]."""
        items = _check_items(items, config)
        vocabulary, idf, components = _fit_text(items, config)
        categorical_values = [
            sorted({v for cell in items[c].tolist() for v in _split_values(cell)}) for c in config.categorical_columns
        ]
        numeric_mean, numeric_std = _fit_standardiser(_numeric_matrix(items, config.numeric_columns))
        if config.vector_column:
            vector_mean, vector_std = _fit_standardiser(_vector_matrix(items, config.vector_column, None))
        else:
            vector_mean, vector_std = np.zeros(0), np.zeros(0)
        return cls(config, vocabulary, idf, components, categorical_values,
                   numeric_mean, numeric_std, vector_mean, vector_std)

    # ------------------------------------------------------------------ transforming
    @property
    def block_dims(self) -> dict[str, int]:
        """Width of each block of the output vector, in output order."""
        return {
            "text": self.text_components.shape[0] if self.config.text_columns else 0,
            "categorical": sum(len(v) for v in self.categorical_values),
            "numeric": len(self.numeric_mean),
            "vector": len(self.vector_mean),
        }

    @property
    def dim(self) -> int:
        """D, the width of the content vectors."""
        return sum(self.block_dims.values())

    def transform(self, items: pd.DataFrame) -> np.ndarray:
        """Content vectors of an items table [M rows] -> float32 [M, D], rows of unit L2 norm (an item with no
        usable content at all gets a zero row)."""
        items = _check_items(items, self.config)
        blocks = []
        if self.config.text_columns:
            blocks.append(self._text_block(items))
        if self.config.categorical_columns:
            blocks.append(self._categorical_block(items))
        if self.config.numeric_columns:
            numeric = (_numeric_matrix(items, self.config.numeric_columns) - self.numeric_mean) / self.numeric_std
            # standardised values have unit variance per dimension: / sqrt(d) gives the block an expected norm of 1
            blocks.append(np.nan_to_num(numeric, nan=0.0) / np.sqrt(numeric.shape[1]))
        if self.config.vector_column:
            vectors = _vector_matrix(items, self.config.vector_column, len(self.vector_mean))
            blocks.append((vectors - self.vector_mean) / self.vector_std / np.sqrt(max(vectors.shape[1], 1)))
        return _l2_rows(np.concatenate(blocks, axis=1)).astype(np.float32)

    def _text_block(self, items: pd.DataFrame) -> np.ndarray:
        """[M, k]: TF-IDF projected on the SVD basis, rows L2-normalised (the usual LSA normalisation, which also
        gives the block unit weight)."""
        tfidf = _tfidf(_documents(items, self.config.text_columns), self._ngram_index, self.text_idf)
        return _l2_rows(np.asarray(tfidf @ self.text_components.T))

    def _categorical_block(self, items: pd.DataFrame) -> np.ndarray:
        """[M, sum of value counts]: one multi-hot per column, each L2-normalised so a multi-valued item does not
        outweigh a single-valued one, then / sqrt(n_columns) so the whole block has norm <= 1."""
        parts = []
        for column, index in zip(self.config.categorical_columns, self._category_index):
            hot = np.zeros((len(items), len(index)), dtype=np.float64)
            for row, cell in enumerate(items[column].tolist()):
                hits = [index[v] for v in _split_values(cell) if v in index]  # values unseen at fit are ignored
                hot[row, hits] = 1.0
            parts.append(_l2_rows(hot))
        return np.concatenate(parts, axis=1) / np.sqrt(len(parts))

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """Fitted parameters: every value is a numeric numpy array or JSON-able (lists, strings, numbers, dicts)."""
        return {
            "format": STATE_FORMAT,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()},
            "text_vocabulary": list(self.text_vocabulary),
            "text_idf": self.text_idf.copy(),
            "text_components": self.text_components.copy(),
            "categorical_values": [list(v) for v in self.categorical_values],
            "numeric_mean": self.numeric_mean.copy(),
            "numeric_std": self.numeric_std.copy(),
            "vector_mean": self.vector_mean.copy(),
            "vector_std": self.vector_std.copy(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ContentEncoder:
        """Rebuilds an encoder from `to_state()` output (arrays may come back from an `.npz`, the rest from JSON)."""
        if int(state.get("format", -1)) != STATE_FORMAT:
            raise ValueError(f"content encoder state has format {state.get('format')}, expected {STATE_FORMAT}")
        return cls(
            ContentFeatureConfig(**state["config"]),
            [str(g) for g in state["text_vocabulary"]],
            state["text_idf"],
            state["text_components"],
            state["categorical_values"],
            state["numeric_mean"],
            state["numeric_std"],
            state["vector_mean"],
            state["vector_std"],
        )


def _fit_text(items: pd.DataFrame, config: ContentFeatureConfig) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Vocabulary (V n-grams), idf [V] and SVD basis [k, V] of the text block; empty when no text is configured."""
    if not config.text_columns:
        return [], np.zeros(0), np.zeros((0, 0))
    documents = _documents(items, config.text_columns)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1)
    try:
        vectorizer.fit(documents)
    except ValueError as err:  # scikit-learn's "empty vocabulary"
        raise ValueError(
            f"text column(s) {list(config.text_columns)} contain no words; {_NEEDS} some text there "
            "(or leave the column out of text_columns)"
        ) from err
    vocabulary = [g for g, _ in sorted(vectorizer.vocabulary_.items(), key=lambda kv: kv[1])]
    idf = vectorizer.idf_.astype(np.float64)
    # the basis is fitted on our own TF-IDF (not the vectorizer's output) so fit and transform share one code path
    tfidf = _tfidf(documents, {g: i for i, g in enumerate(vocabulary)}, idf)
    k = min(config.text_dim, len(vocabulary) - 1, len(documents) - 1)
    if k < 1:
        # one item or one n-gram: nothing to reduce, the TF-IDF itself is the text block
        return vocabulary, idf, np.eye(len(vocabulary))
    svd = TruncatedSVD(n_components=k, algorithm="randomized", random_state=config.seed)
    svd.fit(tfidf)
    return vocabulary, idf, svd.components_.astype(np.float64)


def build_content_vectors(items: pd.DataFrame, config: ContentFeatureConfig) -> tuple[np.ndarray, ContentEncoder]:
    """Fits a `ContentEncoder` on the items table [N rows] and embeds it: float32 [N, D] unit rows and the encoder."""
    encoder = ContentEncoder.fit(items, config)
    return encoder.transform(items), encoder


# ====================================================================== residual k-means
@dataclass(frozen=True)
class ResidualKMeansConfig:
    """Residual k-means: `levels` codebooks of at most `codebook_size` centroids each."""

    levels: int = 3
    codebook_size: int = 256
    seed: int = 0
    max_iter: int = 100
    n_init: int = 1  # k-means restarts per level; 1 keeps fitting cheap, k-means++ seeding is usually enough

    def __post_init__(self) -> None:
        for name in ("levels", "codebook_size", "max_iter", "n_init"):
            if getattr(self, name) < 1:
                raise ValueError(f"residual k-means {name} must be at least 1, got {getattr(self, name)}")


def _nearest(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid [K, D] for each row of [M, D] (squared Euclidean; ties -> lowest index)."""
    distances = (
        np.einsum("md,md->m", vectors, vectors)[:, None]
        - 2.0 * vectors @ centroids.T
        + np.einsum("kd,kd->k", centroids, centroids)[None, :]
    )
    return np.argmin(distances, axis=1).astype(np.int64)


def _count_distinct_rows(matrix: np.ndarray, tolerance: float) -> int:
    """Distinct rows of [N, D] after snapping every value to a grid of `tolerance` (may over-count near a grid
    line, which only lets k-means keep a near-duplicate centroid)."""
    return len(np.unique(np.round(matrix / tolerance), axis=0))


def _as_matrix(vectors: np.ndarray, what: str) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-d array [N, D], got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return matrix


class ResidualQuantizer:
    """L levels of k-means on successive residuals. After `fit`, `codebooks[l]` is [K_l, D] and `codebook_sizes[l]`
    is K_l = min(codebook_size, distinct residual rows at level l) - smaller than configured for small catalogues."""

    def __init__(self, config: ResidualKMeansConfig | None = None) -> None:
        self.config = config or ResidualKMeansConfig()
        self.codebooks: list[np.ndarray] = []

    @property
    def codebook_sizes(self) -> list[int]:
        return [len(c) for c in self.codebooks]

    @property
    def dim(self) -> int:
        self._check_fitted()
        return self.codebooks[0].shape[1]

    def fit(self, vectors: np.ndarray) -> ResidualQuantizer:
        """Fits the codebooks on [N, D] vectors; returns self."""
        residual = _as_matrix(vectors, "vectors to quantise").copy()
        if len(residual) == 0:
            raise ValueError(f"no vectors to quantise (shape {residual.shape}); the semantic tokenizer needs items")
        self.codebooks = []
        # residuals of points that sat on a centroid are float noise (~1e-16), not structure: rows closer than this
        # count as one when sizing a codebook, so a small catalogue gets 1-centroid levels instead of fitting noise
        scale = float(np.abs(residual).max())
        tolerance = 1e-9 * scale if scale > 0 else 1.0
        for level in range(self.config.levels):
            # k-means cannot place more distinct centroids than there are distinct points
            k = min(self.config.codebook_size, _count_distinct_rows(residual, tolerance))
            kmeans = KMeans(
                n_clusters=k,
                n_init=self.config.n_init,
                max_iter=self.config.max_iter,
                random_state=self.config.seed + level,  # levels get different seeds, runs the same ones
            ).fit(residual)
            centroids = kmeans.cluster_centers_.astype(np.float64)
            self.codebooks.append(centroids)
            # assign with `_nearest`, not kmeans.labels_, so fitted items get exactly the codes `encode` gives them
            residual -= centroids[_nearest(residual, centroids)]
        return self

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """Codes of [M, D] vectors (new ones too): int64 [M, L], nearest centroid level by level on residuals."""
        self._check_fitted()
        residual = _as_matrix(vectors, "vectors to encode").copy()
        if residual.shape[1] != self.dim:
            raise ValueError(
                f"vectors to encode have dimension {residual.shape[1]}, the quantizer was fitted on {self.dim}"
            )
        codes = np.zeros((len(residual), len(self.codebooks)), dtype=np.int64)
        for level, centroids in enumerate(self.codebooks):
            codes[:, level] = _nearest(residual, centroids)
            residual -= centroids[codes[:, level]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstruction of int codes [M, L'] (L' <= L: the first L' levels) as the sum of their centroids [M, D]."""
        self._check_fitted()
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] > len(self.codebooks):
            raise ValueError(f"codes must be [M, L'] with L' <= {len(self.codebooks)} levels, got shape {codes.shape}")
        out = np.zeros((codes.shape[0], self.dim), dtype=np.float64)
        for level in range(codes.shape[1]):
            column = codes[:, level]
            if len(column) and (column.min() < 0 or column.max() >= self.codebook_sizes[level]):
                raise ValueError(f"level {level} codes must lie in [0, {self.codebook_sizes[level]})")
            out += self.codebooks[level][column]
        return out

    def to_state(self) -> dict[str, Any]:
        """Config and codebooks: `centroids` [sum K_l, D] (the levels stacked) and `codebook_sizes` [L] as arrays."""
        self._check_fitted()
        return {
            "format": STATE_FORMAT,
            "config": asdict(self.config),
            "codebook_sizes": np.asarray(self.codebook_sizes, dtype=np.int64),
            "centroids": np.concatenate(self.codebooks, axis=0),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ResidualQuantizer:
        """Rebuilds a fitted quantizer from `to_state()` output."""
        if int(state.get("format", -1)) != STATE_FORMAT:
            raise ValueError(f"residual quantizer state has format {state.get('format')}, expected {STATE_FORMAT}")
        quantizer = cls(ResidualKMeansConfig(**state["config"]))
        sizes = np.asarray(state["codebook_sizes"], dtype=np.int64)
        centroids = np.asarray(state["centroids"], dtype=np.float64)
        if sizes.sum() != len(centroids):
            raise ValueError(
                f"residual quantizer state: codebook sizes sum to {sizes.sum()} but it holds {len(centroids)} centroids"
            )
        quantizer.codebooks = np.split(centroids, np.cumsum(sizes)[:-1])
        return quantizer

    def _check_fitted(self) -> None:
        if not self.codebooks:
            raise ValueError("the residual quantizer is not fitted: call fit(vectors) first")


# ====================================================================== ID assembly and quality
def assign_tiebreak(codes: np.ndarray) -> np.ndarray:
    """Tie-break [N] (int64) for codes [N, L]: the rank, in row order, of each item among those with the same code
    tuple - so (codes, tiebreak) is unique per item."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-d array [N, L], got shape {codes.shape}")
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.ravel()
    order = np.argsort(group, kind="stable")  # stable: within a group, rows stay in row order
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    position = np.arange(len(order))
    rank_sorted = position - starts[np.searchsorted(starts, position, side="right") - 1]
    tiebreak = np.empty(len(codes), dtype=np.int64)
    tiebreak[order] = rank_sorted
    return tiebreak


def code_report(codes: np.ndarray, codebook_sizes: list[int]) -> dict[str, Any]:
    """Quality of codes [N, L]: `usage` (per level, distinct codes used / codebook size), `collision_rate` (share of
    items whose code tuple another item shares), `max_tiebreak` and `n_items`."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != len(codebook_sizes):
        raise ValueError(
            f"codes [N, L] must have one column per codebook size ({len(codebook_sizes)}), got shape {codes.shape}"
        )
    n = len(codes)
    if n == 0:
        return {"usage": [0.0] * len(codebook_sizes), "collision_rate": 0.0, "max_tiebreak": 0, "n_items": 0}
    _, group, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return {
        "usage": [len(np.unique(codes[:, level])) / size for level, size in enumerate(codebook_sizes)],
        "collision_rate": float((counts[group.ravel()] > 1).mean()),
        "max_tiebreak": int(assign_tiebreak(codes).max()),
        "n_items": n,
    }
