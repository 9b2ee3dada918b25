"""Semantic IDs: content vectors, residual k-means codes, tie-breaks and the code report."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from lum.semantic_ids import (
    ContentEncoder,
    ContentFeatureConfig,
    ResidualKMeansConfig,
    ResidualQuantizer,
    assign_tiebreak,
    build_content_vectors,
    code_report,
)

N_CLUSTERS, PER_CLUSTER, DIM = 8, 40, 16


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8 well-separated clusters in 16-d, 40 items each, in shuffled row order: (vectors [320, 16], labels [320],
    centres [8, 16])."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(N_CLUSTERS, DIM)) * 10.0
    labels = np.repeat(np.arange(N_CLUSTERS), PER_CLUSTER)
    vectors = centres[labels] + rng.normal(size=(len(labels), DIM)) * 0.3
    order = rng.permutation(len(labels))
    return vectors[order], labels[order], centres


@pytest.fixture(scope="module")
def fitted(clustered) -> tuple[ResidualQuantizer, np.ndarray]:
    vectors, _, _ = clustered
    quantizer = ResidualQuantizer(ResidualKMeansConfig(levels=3, codebook_size=8, seed=0, max_iter=50)).fit(vectors)
    return quantizer, quantizer.encode(vectors)


def _roundtrip(state: dict) -> dict:
    """What a persisted state comes back as: arrays through an .npz (no pickle), everything else through JSON."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as loaded:
        restored = {k: loaded[k] for k in loaded.files}
    restored.update(json.loads(json.dumps(rest)))
    return restored


# ====================================================================== residual k-means
def test_level0_codes_recover_clusters(clustered, fitted):
    _, labels, _ = clustered
    quantizer, codes = fitted
    assert codes.shape == (N_CLUSTERS * PER_CLUSTER, 3) and codes.dtype == np.int64
    level0_of_cluster = []
    for cluster in range(N_CLUSTERS):
        cluster_codes = np.unique(codes[labels == cluster, 0])
        assert len(cluster_codes) == 1, f"cluster {cluster} split over level-0 codes {cluster_codes}"
        level0_of_cluster.append(int(cluster_codes[0]))
    assert len(set(level0_of_cluster)) == N_CLUSTERS
    assert quantizer.codebook_sizes == [8, 8, 8]


def test_reconstruction_error_falls_with_levels(clustered, fitted):
    vectors, _, _ = clustered
    quantizer, codes = fitted
    errors = [
        float(np.mean(np.sum((vectors - quantizer.decode(codes[:, : level + 1])) ** 2, axis=1))) for level in range(3)
    ]
    assert errors[1] < errors[0]
    assert errors[2] < errors[1]
    # level 0 alone leaves only the within-cluster noise: 16 dims x 0.3^2 per item, give or take
    assert errors[0] < 2.0 < float(np.mean(np.sum(vectors**2, axis=1)))


def test_same_seed_same_codes(clustered, fitted):
    vectors, _, _ = clustered
    _, codes = fitted
    again = ResidualQuantizer(ResidualKMeansConfig(levels=3, codebook_size=8, seed=0, max_iter=50)).fit(vectors)
    np.testing.assert_array_equal(again.encode(vectors), codes)


def test_encode_new_vector_near_a_centre(clustered, fitted):
    vectors, labels, centres = clustered
    quantizer, codes = fitted
    rng = np.random.default_rng(99)
    new = centres + rng.normal(size=centres.shape) * 0.1  # one unseen item near each cluster's centre
    new_codes = quantizer.encode(new)
    for cluster in range(N_CLUSTERS):
        assert new_codes[cluster, 0] == codes[labels == cluster, 0][0]


def test_quantizer_state_roundtrip(clustered, fitted):
    vectors, _, _ = clustered
    quantizer, codes = fitted
    restored = ResidualQuantizer.from_state(_roundtrip(quantizer.to_state()))
    assert restored.codebook_sizes == quantizer.codebook_sizes
    np.testing.assert_array_equal(restored.encode(vectors), codes)
    np.testing.assert_array_equal(restored.decode(codes), quantizer.decode(codes))


def test_codebook_larger_than_catalogue():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(10, 4))
    vectors[9] = vectors[8]  # a duplicate: 9 distinct rows
    quantizer = ResidualQuantizer(ResidualKMeansConfig(levels=3, codebook_size=256)).fit(vectors)
    # level 0 puts every distinct row on its own centroid, so later residuals are all zero: one centroid suffices
    assert quantizer.codebook_sizes == [9, 1, 1]
    codes = quantizer.encode(vectors)
    assert len({tuple(c) for c in codes[:9]}) == 9
    assert tuple(codes[8]) == tuple(codes[9])
    np.testing.assert_allclose(quantizer.decode(codes), vectors, atol=1e-9)
    tiebreak = assign_tiebreak(codes)
    assert tiebreak[9] == 1 and len({(*c, t) for c, t in zip(codes.tolist(), tiebreak.tolist())}) == 10


def test_quantizer_rejects_bad_input():
    quantizer = ResidualQuantizer()
    with pytest.raises(ValueError, match="not fitted"):
        quantizer.encode(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="no vectors"):
        quantizer.fit(np.zeros((0, 3)))
    quantizer.fit(np.eye(3))
    with pytest.raises(ValueError, match="dimension 4"):
        quantizer.encode(np.zeros((1, 4)))


# ====================================================================== tie-breaks and report
def test_assign_tiebreak_and_report_by_hand():
    codes = np.array([[1, 2], [1, 2], [3, 4], [1, 2]])
    np.testing.assert_array_equal(assign_tiebreak(codes), [0, 1, 0, 2])
    assert assign_tiebreak(codes).dtype == np.int64
    report = code_report(codes, [4, 8])
    assert report["collision_rate"] == pytest.approx(0.75)
    assert report["max_tiebreak"] == 2
    assert report["usage"] == [pytest.approx(2 / 4), pytest.approx(2 / 8)]
    assert report["n_items"] == 4


def test_tiebreak_follows_row_order_with_interleaved_groups():
    codes = np.array([[5], [0], [5], [0], [0], [7]])
    np.testing.assert_array_equal(assign_tiebreak(codes), [0, 0, 1, 1, 2, 0])
    report = code_report(codes, [8])
    assert report["collision_rate"] == pytest.approx(5 / 6)
    assert report["usage"] == [pytest.approx(3 / 8)]


# ====================================================================== content vectors
CONTENT = ContentFeatureConfig(
    text_columns=("title",),
    categorical_columns=("genres",),
    numeric_columns=("year",),
    vector_column="emb",
    text_dim=4,
)


def _items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "e", "f", "g"],
            "title": ["Toy Story", "Toy Story", "Heat", "Untitled", "Untitled", "Untitled", "Jumanji the game"],
            "genres": ["Animation|Comedy", "Animation|Comedy", "Action|Crime", "Comedy|Romance", "Romance",
                       "Action|Thriller", "Adventure"],
            "year": [1995.0, 1995.0, None, 2001.0, 2001.0, 2001.0, 1990.0],
            "emb": [[1.0, 0.0, 0.5], [1.0, 0.0, 0.5], [0.0, 1.0, 0.2], [0.3, 0.3, 0.3], [0.3, 0.3, 0.3],
                    [0.3, 0.3, 0.3], [0.9, 0.1, 0.0]],
        }
    )


def test_content_vectors_shape_norm_and_similarity():
    items = _items()
    vectors, encoder = build_content_vectors(items, CONTENT)
    assert vectors.dtype == np.float32
    # text: min(text_dim 4, n_features - 1, n_items - 1) = 4; genres: 7 values; year: 1; emb: 3
    assert encoder.block_dims == {"text": 4, "categorical": 7, "numeric": 1, "vector": 3}
    assert vectors.shape == (7, encoder.dim) == (7, 15)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(vectors[0], vectors[1])  # identical content, identical vector
    # d, e, f differ only in genres: d and e share Romance, d and f share nothing
    cos = vectors @ vectors.T
    assert cos[3, 4] > cos[3, 5] + 0.05
    # fitting and transforming take the same path
    np.testing.assert_array_equal(encoder.transform(items), vectors)


def test_content_encoder_embeds_new_items():
    _, encoder = build_content_vectors(_items(), CONTENT)
    new = pd.DataFrame(
        {
            "title": ["Toy Story", "Toy Story", "A brand new film"],
            "genres": ["Comedy|Documentary", "Comedy", "Documentary"],  # Documentary was never seen
            "year": [1995, 1995, None],
            "emb": [[1.0, 0.0, 0.5], [1.0, 0.0, 0.5], [0.2, 0.2, 0.2]],
        }
    )
    vectors = encoder.transform(new)
    assert vectors.shape == (3, encoder.dim)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(vectors[0], vectors[1])  # the unseen value is ignored, not an error
    # no known words and no known genre: those blocks are zero, the rest still carries the item
    text = slice(0, encoder.block_dims["text"])
    genres = slice(text.stop, text.stop + encoder.block_dims["categorical"])
    assert not vectors[2, text].any() and not vectors[2, genres].any()


def test_content_encoder_state_roundtrip():
    items = _items()
    vectors, encoder = build_content_vectors(items, CONTENT)
    state = encoder.to_state()
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            assert value.dtype.kind in "fiu", f"{key} is not a numeric array"
        else:
            json.dumps(value)
    restored = ContentEncoder.from_state(_roundtrip(state))
    assert restored.config == CONTENT
    np.testing.assert_array_equal(restored.transform(items), vectors)
    new = items.assign(title=["toy heat", "game story", "", None, "Untitled Heat", "x", "the"])
    np.testing.assert_array_equal(restored.transform(new), encoder.transform(new))


def test_single_block_configs():
    items = _items()
    text_only, _ = build_content_vectors(items, ContentFeatureConfig(text_columns=("title",)))
    assert cosine(text_only[3], text_only[4]) == pytest.approx(1.0)
    year_only, encoder = build_content_vectors(items, ContentFeatureConfig(numeric_columns=("year",)))
    # one standardised number, row-normalised: its sign; the null year sits at the mean and gives a zero row
    assert encoder.dim == 1 and year_only[2, 0] == 0.0 and set(np.abs(np.delete(year_only[:, 0], 2))) == {1.0}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ====================================================================== errors
def test_error_missing_column_names_missing_and_available():
    items = _items()
    config = ContentFeatureConfig(text_columns=("title", "plot"), categorical_columns=("tags",))
    with pytest.raises(ValueError, match="semantic tokenizer") as err:
        build_content_vectors(items, config)
    message = str(err.value)
    assert "'plot'" in message and "'tags'" in message and "'genres'" in message and "'item_id'" in message


def test_error_no_columns_configured():
    with pytest.raises(ValueError, match="no content columns configured.*semantic tokenizer"):
        build_content_vectors(_items(), ContentFeatureConfig())


def test_error_vector_column_ragged_or_null():
    items = _items()
    ragged = items.assign(emb=[[1.0, 2.0, 3.0]] * 6 + [[1.0, 2.0]])
    with pytest.raises(ValueError, match="vector column 'emb'.*different lengths"):
        build_content_vectors(ragged, ContentFeatureConfig(vector_column="emb"))
    nulls = items.assign(emb=[[1.0, 2.0, 3.0]] * 6 + [None])
    with pytest.raises(ValueError, match="vector column 'emb' is null in row 6"):
        build_content_vectors(nulls, ContentFeatureConfig(vector_column="emb"))
    _, encoder = build_content_vectors(items, ContentFeatureConfig(vector_column="emb"))
    with pytest.raises(ValueError, match="vector column 'emb' has length 2.*fitted on length 3"):
        encoder.transform(items.assign(emb=[[1.0, 2.0]] * 7))


def test_error_zero_rows():
    with pytest.raises(ValueError, match="zero rows.*'title'"):
        build_content_vectors(_items().iloc[:0], ContentFeatureConfig(text_columns=("title",)))


def test_error_text_without_words_and_non_numeric():
    items = _items()
    with pytest.raises(ValueError, match=r"text column\(s\) \['title'\] contain no words"):
        build_content_vectors(items.assign(title=None), ContentFeatureConfig(text_columns=("title",)))
    with pytest.raises(ValueError, match="numeric column 'title'"):
        build_content_vectors(items, ContentFeatureConfig(numeric_columns=("title",)))
