"""Ranker inputs: the schema contract, vocabularies, KJTs with shared tables, LUM interest matching, the time split,
and bad input. No training here (test_ranker_train.py trains)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torchrec import EmbeddingBagCollection

from benchmarks.synthetic import SyntheticConfig, synthetic_training_set
from ranker.features import OOV, FeatureConfig, FeaturePipeline, Vocabulary, lum_features, relative_to_request, request_condition
from ranker.schema import (
    HISTORY_ITEMS,
    METADATA_KEY,
    FeatureSchema,
    RankerInputError,
    as_arrow,
    check_table,
    read_metadata,
    slug,
    validate_training_table,
)
from ranker.train import time_split


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return synthetic_training_set(SyntheticConfig(rows=2_000, users=100, items=300, lum_dim=8, seed=3))


@pytest.fixture(scope="module")
def schema(table) -> FeatureSchema:
    return FeatureSchema.from_table(table)


def with_metadata(table: pa.Table, **changes) -> pa.Table:
    meta = {**read_metadata(table), **changes}
    return table.replace_schema_metadata({METADATA_KEY.encode(): json.dumps(meta).encode()})


def replace_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


# ---------------------------------------------------------------------------------------------------- schema


def test_metadata_from_arrow_schema_and_pandas_attrs(table, schema):
    frame = table.to_pandas()
    assert read_metadata(frame) is None
    frame.attrs[METADATA_KEY] = read_metadata(table)
    assert FeatureSchema.from_table(frame) == schema
    frame.attrs[METADATA_KEY] = json.dumps(read_metadata(table))  # a JSON string works too
    assert FeatureSchema.from_table(as_arrow(frame)) == schema
    assert schema.lum_dim == 8 and schema.context_columns == ("surface", "device", "daypart", "hour")
    assert schema.lum_conditions["surface_home_device_mobile"] == "surface=home|device=mobile"
    assert slug("surface=home|device=mobile") == "surface_home_device_mobile"
    assert FeatureSchema.from_json(json.loads(json.dumps(schema.to_json()))) == schema


def test_table_without_metadata_is_a_clear_error(table):
    with pytest.raises(RankerInputError, match="no 'lum.training_set' metadata"):
        FeatureSchema.from_table(table.replace_schema_metadata({}))


def test_columns_not_listed_as_features_never_reach_the_inputs(table, schema):
    """`feedback` (post-event, derived from the label), `p_click` and `relevance` (ground truth) sit in the table;
    scrambling them, or adding a perfect label copy, changes no input of any variant."""
    rng = np.random.default_rng(0)
    label = pc.cast(table.column("label"), pa.int64()).to_numpy()
    scrambled = table
    for name in ("feedback", "p_click", "relevance", "row_id"):
        scrambled = replace_column(scrambled, name, pa.array(rng.permutation(table.column(name).to_numpy())))
    scrambled = scrambled.append_column("label_copy", pa.array(label))
    for variant in ("base", "lum", "pooled-history", "lum+pooled"):
        pipeline = FeaturePipeline.fit(table, schema, variant)
        assert not {"feedback", "p_click", "relevance", "row_id", "label", "ts", "label_copy"} & set(schema.feature_columns(variant))
        a, b = pipeline.dlrm_inputs(table), pipeline.dlrm_inputs(scrambled)
        assert torch.equal(a.dense, b.dense) and a.keys == b.keys
        assert all(np.array_equal(x, y) for x, y in zip(a.ids, b.ids))
        (xa, names), (xb, _) = pipeline.lightgbm_inputs(table), pipeline.lightgbm_inputs(scrambled)
        assert np.array_equal(xa, xb, equal_nan=True)
        assert not [n for n in names + pipeline.dense_names if any(bad in n for bad in ("feedback", "p_click", "relevance", "label"))]


def test_condition_on_a_column_that_is_not_a_feature_never_matches(table, schema):
    """A LUM condition on `feedback` must not let the post-event column in through lum_sim_request."""
    leaky = FeatureSchema.from_metadata({**read_metadata(table), "lum_conditions": {"feedback_5": "feedback=5"}})
    assert (request_condition(table, leaky) == -1).all()


# ---------------------------------------------------------------------------------------------------- sparse


def test_vocabulary_orders_by_frequency_and_maps_unknown_and_null_to_oov():
    vocab = Vocabulary.fit([pa.array(["b", "a", "b", None, "c", "b", "a"])], min_count=2)
    assert vocab.values == ["b", "a"] and vocab.num_embeddings == 3
    assert vocab.ids(pa.array(["a", "b", "c", None, "zzz"])).tolist() == [2, 1, OOV, OOV, OOV]
    assert Vocabulary.fit([pa.array(["x", "y", "y"])], max_vocab=1).values == ["y"]
    assert Vocabulary.fit([pa.array([7, 7, 3])]).ids(pa.array([3, 7])).tolist() == [2, 1]  # int columns as strings


def test_history_shares_the_item_table_with_mean_pooling(table, schema):
    pipeline = FeaturePipeline.fit(table, schema, "pooled-history")
    tables = {t.name: t for t in pipeline.embedding_tables(4)}
    assert tables["t_item_id"].feature_names == ["item_id", "hist_item_ids"]
    assert tables["t_item_category"].feature_names == ["item_category", "hist_categories"]
    assert tables["t_user_id"].feature_names == ["user_id"]
    assert tables["t_item_id"].pooling.name == "MEAN"
    # one table serves both keys: the pooled history is the mean of the history items' own rows
    ebc = EmbeddingBagCollection(tables=list(tables.values()))
    inputs = pipeline.dlrm_inputs(table)
    rows = np.array([i for i in range(20) if inputs.offsets[-2][i + 1] > inputs.offsets[-2][i]][:5])
    _, kjt, _ = inputs.batch(rows)
    pooled = ebc(kjt).to_dict()
    weight = ebc.embedding_bags["t_item_id"].weight.detach()
    hist = inputs.keys.index("hist_item_ids")
    for j, row in enumerate(rows):
        ids = inputs.ids[hist][inputs.offsets[hist][row] : inputs.offsets[hist][row + 1]]
        torch.testing.assert_close(pooled["hist_item_ids"][j], weight[torch.from_numpy(ids)].mean(0))
    item = inputs.keys.index("item_id")
    torch.testing.assert_close(pooled["item_id"][0], weight[int(inputs.ids[item][rows[0]])])


def test_history_keeps_the_newest_items(schema):
    t = synthetic_training_set(SyntheticConfig(rows=50, users=5, items=30, lum_dim=4, seed=1))
    pipeline = FeaturePipeline.fit(t, FeatureSchema.from_table(t), "pooled-history", FeatureConfig(history_len=2))
    inputs = pipeline.dlrm_inputs(t)
    hist = inputs.keys.index("hist_item_ids")
    vocab = pipeline.vocabularies["item_id"]
    for row, items in enumerate(t.column("hist_item_ids").to_pylist()):
        got = inputs.ids[hist][inputs.offsets[hist][row] : inputs.offsets[hist][row + 1]]
        assert got.tolist() == vocab.ids(pa.array(items[-2:], pa.string())).tolist()


def test_fit_dlrm_gives_the_inputs_fit_then_dlrm_inputs_give(table, schema):
    config = FeatureConfig(request_features=True)
    pipeline, inputs = FeaturePipeline.fit_dlrm(table, schema, "lum+pooled", config)
    again = FeaturePipeline.fit(table, schema, "lum+pooled", config)
    assert pipeline.to_json() == again.to_json()
    expected = again.dlrm_inputs(table)
    assert torch.equal(inputs.dense, expected.dense) and torch.equal(inputs.labels, expected.labels)
    assert inputs.keys == expected.keys and all(np.array_equal(a, b) for a, b in zip(inputs.ids, expected.ids))


def test_batch_gathers_the_requested_rows(table, schema):
    pipeline = FeaturePipeline.fit(table, schema, "lum+pooled")
    inputs = pipeline.dlrm_inputs(table)
    rows = np.array([5, 0, 17, 17, 3])
    dense, kjt, labels = inputs.batch(rows)
    assert dense.shape == (5, len(pipeline.dense_names)) and torch.equal(dense, inputs.dense[rows])
    assert torch.equal(labels, inputs.labels[rows])
    whole = inputs.batch()[1].to_dict()
    for key, jt in kjt.to_dict().items():
        assert [x.tolist() for x in jt.to_dense()] == [whole[key].to_dense()[r].tolist() for r in rows]


# ---------------------------------------------------------------------------------------------------- dense / LUM


def test_lum_similarities_and_the_request_condition(table, schema):
    lum = lum_features(table, schema)
    names = list(schema.lum_conditions)
    user_vectors = [table.column(f"lum_user__{s}").to_pylist() for s in names]
    item_vectors = table.column("lum_item").to_pylist()
    surfaces, devices = table.column("surface").to_pylist(), table.column("device").to_pylist()
    seen_combined = seen_none = 0
    for row in range(200):
        expected_k = {"home": 0, "search": 1, "item_detail": 2}[surfaces[row]]
        if surfaces[row] == "home" and devices[row] == "mobile":
            expected_k, seen_combined = 3, seen_combined + 1  # the most specific condition wins
        missing = item_vectors[row] is None or user_vectors[0][row] is None
        assert lum.missing[row] == float(missing)
        if missing:
            seen_none += 1
            assert np.isnan(lum.sim_request[row]) and lum.request_missing[row] == 1.0
            continue
        for k in range(len(names)):
            user, item = np.asarray(user_vectors[k][row]), np.asarray(item_vectors[row])
            assert lum.sims[row, k] == pytest.approx(np.dot(user, item), rel=1e-5, abs=1e-6)
            assert lum.cosines[row, k] == pytest.approx(np.dot(user, item) / np.linalg.norm(user) / np.linalg.norm(item), rel=1e-4, abs=1e-6)
        assert lum.sim_request[row] == lum.sims[row, expected_k] and lum.request_missing[row] == 0.0
        assert lum.cos_request[row] == lum.cosines[row, expected_k]
    assert seen_combined > 0 and seen_none > 0


def test_no_matching_condition_gives_zero_and_a_flag(table, schema):
    """Rows on a surface no condition names: lum_sim_request is 0 after standardisation, its flag 1; a missing
    vector gives zeros and missing_lum = 1."""
    cart = replace_column(table, "surface", pa.array(["cart"] * table.num_rows))
    pipeline = FeaturePipeline.fit(table, schema, "lum")
    dense = pipeline.dlrm_inputs(cart).dense
    at = {name: i for i, name in enumerate(pipeline.dense_names)}
    assert (dense[:, at["lum_sim_request"]] == 0).all() and (dense[:, at["flag:lum_sim_request_missing"]] == 1).all()
    missing = pc.cast(table.column("missing_lum"), pa.int64()).to_numpy() == 1
    own = pipeline.dlrm_inputs(table).dense
    assert missing.any() and (own[missing][:, at["flag:missing_lum"]] == 1).all()
    assert (own[~missing][:, at["flag:missing_lum"]] == 0).all()
    with_vectors = FeaturePipeline.fit(table, schema, "lum", FeatureConfig(lum_inputs="vectors"))
    vectors_dense = with_vectors.dlrm_inputs(table).dense
    lum_cols = [i for i, n in enumerate(with_vectors.dense_names) if n.startswith("lum_item:")]
    assert len(lum_cols) == schema.lum_dim
    assert (vectors_dense[pc.is_null(table.column("lum_item")).to_numpy(zero_copy_only=False)][:, lum_cols] == 0).all()


def test_lum_inputs_scores_or_vectors(table, schema):
    """"scores" (the default) gives K dot products and K cosines plus the request ones; "vectors" adds K * D + D."""
    k, d = len(schema.lum_conditions), schema.lum_dim
    scores = FeaturePipeline.fit(table, schema, "lum")
    vectors = FeaturePipeline.fit(table, schema, "lum", FeatureConfig(lum_inputs="vectors"))
    base = FeaturePipeline.fit(table, schema, "base")
    lum_names = [n for n in scores.dense_names if n not in base.dense_names]
    assert sorted(lum_names) == sorted([f"lum_sim:{s}" for s in schema.lum_conditions] + [f"lum_cos:{s}" for s in schema.lum_conditions]
                                       + ["lum_sim_request", "lum_cos_request", "flag:lum_sim_request_missing", "flag:missing_lum"])
    assert len(vectors.dense_names) == len(scores.dense_names) + k * d + d
    x_scores, names_scores = scores.lightgbm_inputs(table)
    x_vectors, names_vectors = vectors.lightgbm_inputs(table)
    assert x_vectors.shape[1] == x_scores.shape[1] + k * d + d and set(names_scores) < set(names_vectors)
    with pytest.raises(ValueError, match="lum_inputs"):
        FeatureConfig(lum_inputs="everything")


def test_relative_to_request_values():
    values = np.array([[1.0, 5.0], [3.0, np.nan], [2.0, 1.0], [10.0, 2.0]])
    out = relative_to_request(values, np.array([0, 0, 0, 1]))
    assert out.shape == (4, 6)
    np.testing.assert_allclose(out[:, 0], [-1, 1, 0, 0])  # minus the request's mean
    np.testing.assert_allclose(out[:, 2], [-2, 0, -1, 0])  # minus the request's max
    np.testing.assert_allclose(out[:, 4], [3, 1, 2, 1])  # rank, 1 = highest
    np.testing.assert_allclose(out[:, [1, 3, 5]], [[2, 0, 1], [np.nan] * 3, [-2, -4, 2], [0, 0, 1]])  # NaN left out


def test_relative_to_one_request_takes_numpy_and_gives_the_groupby_numbers():
    """One request (the ranking service's case) skips pandas' groupby; ties, NaN and an all-NaN column as before."""
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=(50, 4)), 1)  # rounded: ties
    values[rng.random((50, 4)) < 0.2] = np.nan
    values[:, 3] = np.nan
    one = relative_to_request(values, np.zeros(50, dtype=np.int64))
    # the same rows as the first of two requests: the groupby path
    two = relative_to_request(np.concatenate([values, values[::-1]]), np.repeat([0, 1], 50))[:50]
    np.testing.assert_array_equal(np.isnan(one), np.isnan(two))
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-6, equal_nan=True)


def _slates(table: pa.Table, rows: int, size: int) -> pa.Table:
    """The first `rows` rows regrouped into requests of `size` candidates (one user and one time each)."""
    part = table.slice(0, rows)
    first = pa.array((np.arange(rows) // size) * size)
    part = replace_column(part, "user_id", part.column("user_id").take(first))
    return replace_column(part, "ts", part.column("ts").take(first))


def test_request_features_compare_a_candidate_with_its_own_request_only(table, schema):
    slates = _slates(table, 200, 10)
    pipeline = FeaturePipeline.fit(slates, schema, "lum", FeatureConfig(request_features=True))
    x, names = pipeline.lightgbm_inputs(slates)
    condition = next(iter(schema.lum_conditions))
    sims = x[:, names.index(f"lum_sim__{condition}")].reshape(20, 10)
    ranks = x[:, names.index(f"lum_sim__{condition}__request_rank")].reshape(20, 10)
    below_top = x[:, names.index(f"lum_sim__{condition}__vs_request_max")].reshape(20, 10)
    assert np.isnan(sims).any() and (np.isnan(ranks) == np.isnan(sims)).all()  # a candidate without LUM vectors has no rank
    assert (np.nanargmin(ranks, axis=1) == np.nanargmax(sims, axis=1)).all() and np.nanmin(ranks) == 1 and np.nanmax(ranks) <= 10
    np.testing.assert_allclose(below_top, sims - np.nanmax(sims, axis=1, keepdims=True), atol=1e-5)
    assert "item_ctr__vs_request_mean" in names
    relative = [i for i, n in enumerate(names) if "request_" in n]
    # neither the labels nor any other request reach a row's request features
    flipped = replace_column(slates, "label", pc.subtract(pa.scalar(1, pa.int8()), slates.column("label")))
    np.testing.assert_array_equal(pipeline.lightgbm_inputs(flipped)[0][:, relative], x[:, relative])
    np.testing.assert_array_equal(pipeline.lightgbm_inputs(slates.slice(30, 10))[0][:, relative], x[30:40, relative])
    # a candidate of the same request does: in a slate of equal CTRs, the one raised above the rest ranks first
    best = int(np.argmax(sims[0]))
    ctr = np.r_[np.full(10, 0.001), slates.column("item_ctr").to_numpy()[10:]]
    ctr[(best + 1) % 10] = 0.9
    ctr_rank = pipeline.lightgbm_inputs(replace_column(slates, "item_ctr", pa.array(ctr)))[0][:, names.index("item_ctr__request_rank")]
    assert ctr_rank[(best + 1) % 10] == 1 and ctr_rank[best] > 1
    # the DLRM gets the same block, standardised on the training rows
    assert sum(n.startswith("request:") for n in pipeline.dense_names) == len(relative)
    assert torch.isfinite(pipeline.dlrm_inputs(slates).dense).all()


def test_request_features_need_the_request_time(table, schema):
    pipeline = FeaturePipeline.fit(table, schema, "base", FeatureConfig(request_features=True))
    with pytest.raises(RankerInputError, match="request features need column 'ts'"):
        pipeline.lightgbm_inputs(table.drop(["ts"]))


def test_lightgbm_gets_the_ids_only_when_asked(table, schema):
    plain = FeaturePipeline.fit(table, schema, "base")
    with_ids = FeaturePipeline.fit(table, schema, "base", FeatureConfig(lightgbm_ids=True))
    assert schema.user not in plain.lightgbm_categorical and schema.item not in plain.lightgbm_categorical
    assert schema.category in plain.lightgbm_categorical
    assert plain.lightgbm_inputs(table)[1][: len(plain.lightgbm_categorical)] == plain.lightgbm_categorical
    names = with_ids.lightgbm_inputs(table)[1]
    assert schema.user in names and schema.item in names and set(with_ids.lightgbm_categorical) == set(schema.categorical_columns)
    assert len(plain.dense_names) == len(with_ids.dense_names)  # lightgbm_ids changes LightGBM's inputs only


def test_dlrm_without_id_tables_keeps_the_history_and_lightgbm_ids(table, schema):
    """dlrm_ids=False: no user or item id key (nor a user table); the pooled history still pools the item table;
    LightGBM's ids, when asked, still get their vocabularies."""
    with_ids = FeaturePipeline.fit(table, schema, "lum+pooled")
    without = FeaturePipeline.fit(table, schema, "lum+pooled", FeatureConfig(dlrm_ids=False, lightgbm_ids=True))
    keys = [f.key for f in without.sparse_features]
    assert schema.user not in keys and schema.item not in keys
    assert set(keys) == {f.key for f in with_ids.sparse_features} - {schema.user, schema.item}
    assert HISTORY_ITEMS in keys and schema.category in keys
    tables = {t.name: list(t.feature_names) for t in without.embedding_tables(8)}
    assert tables[f"t_{schema.item}"] == [HISTORY_ITEMS] and f"t_{schema.user}" not in tables
    # the history item rows are the same vocabulary as with the id tables (items seen only in histories included)
    assert without.vocabularies[schema.item].values == with_ids.vocabularies[schema.item].values
    inputs = without.dlrm_inputs(table)
    assert inputs.keys == keys and len(inputs.ids) == len(keys)
    names = without.lightgbm_inputs(table)[1]
    assert schema.user in names and schema.item in names
    assert without.dense_names == with_ids.dense_names


def test_counters_are_log_scaled_and_standardised_on_training_rows(table, schema):
    pipeline = FeaturePipeline.fit(table, schema, "base")
    dense = pipeline.dlrm_inputs(table).dense.numpy()
    j = pipeline.dense_names.index("counter:item_n_impressions")
    raw = table.column("item_n_impressions").to_numpy(zero_copy_only=False)
    known = ~np.isnan(raw)
    assert dense[known, j].mean() == pytest.approx(0, abs=1e-3) and dense[known, j].std() == pytest.approx(1, abs=1e-3)
    assert (dense[~known, j] == 0).all()
    order = np.argsort(raw[known])
    assert (np.diff(dense[known, j][order]) >= 0).all()  # monotone transform


def test_lightgbm_history_numbers():
    t = synthetic_training_set(SyntheticConfig(rows=300, users=10, items=40, lum_dim=4, seed=2))
    pipeline = FeaturePipeline.fit(t, FeatureSchema.from_table(t), "pooled-history")
    x, names = pipeline.lightgbm_inputs(t)
    col = {n: i for i, n in enumerate(names)}
    for row, (cats, items, cat, item) in enumerate(zip(*(t.column(c).to_pylist() for c in ("hist_categories", "hist_item_ids", "item_category", "item_id")))):
        assert x[row, col["hist_len"]] == len(cats)
        if cats:
            assert x[row, col["hist_share_in_category"]] == pytest.approx(sum(c == cat for c in cats) / len(cats))
        else:
            assert np.isnan(x[row, col["hist_share_in_category"]])
        assert x[row, col["hist_has_item"]] == float(item in items)
    assert set(pipeline.lightgbm_categorical) <= set(names)


# ---------------------------------------------------------------------------------------------------- time split


def test_time_split_takes_the_latest_rows(table):
    times = pc.cast(table.column("ts"), pa.int64()).to_numpy()
    assert (np.diff(times) < 0).any()  # the table is not in time order: the split must sort
    split = time_split(table, 0.1)
    assert times[split.valid].min() > times[split.fit].max()
    assert abs(len(split.valid) - 0.1 * table.num_rows) <= 1
    assert np.array_equal(np.sort(np.concatenate([split.fit, split.valid])), np.arange(table.num_rows))
    assert split.cut == pd.Timestamp(int(times[split.valid].min()), unit="us", tz="UTC")


def test_time_split_keeps_a_timestamp_on_one_side():
    ts = pd.to_datetime(["2025-01-01"] * 6 + ["2025-01-02"] * 4, utc=True)
    split = time_split(pd.DataFrame({"ts": ts}), 0.3)
    assert split.valid.tolist() == [6, 7, 8, 9]  # the cut time's rows all go to validation
    with pytest.raises(RankerInputError, match="same 'ts'"):
        time_split(pd.DataFrame({"ts": ts[:3]}), 0.1)


# ---------------------------------------------------------------------------------------------------- bad input


def test_training_set_without_positives_or_negatives(table, schema):
    for value, word in ((0, "no positives"), (1, "no negatives")):
        one_class = replace_column(table, "label", pa.array(np.full(table.num_rows, value, dtype=np.int8)))
        with pytest.raises(RankerInputError, match=word):
            validate_training_table(one_class, schema, "base")


def test_feature_null_for_every_row(table, schema):
    nulls = replace_column(table, "user_ctr", pa.nulls(table.num_rows, pa.float64()))
    with pytest.raises(RankerInputError, match="null .* for every row: user_ctr"):
        validate_training_table(nulls, schema, "base")
    no_lum = table
    for name in schema.lum_user_columns + ["lum_item"]:
        no_lum = replace_column(no_lum, name, pa.nulls(table.num_rows, pa.list_(pa.float32())))
    validate_training_table(no_lum, schema, "base")  # base does not read them
    with pytest.raises(RankerInputError, match="lum features ingest"):
        validate_training_table(no_lum, schema, "lum")
    empty = replace_column(table, "hist_item_ids", pa.array([[]] * table.num_rows, pa.list_(pa.string())))
    with pytest.raises(RankerInputError, match="hist_item_ids"):
        validate_training_table(empty, schema, "pooled-history")


def test_variant_whose_features_are_absent(table, schema):
    no_lum = table.drop_columns(schema.lum_user_columns + ["lum_item"])
    no_lum_schema = FeatureSchema.from_table(with_metadata(no_lum, lum_conditions={}, lum_dim=None))
    with pytest.raises(RankerInputError, match="run `lum features ingest` for a model version, then rebuild the training set"):
        validate_training_table(no_lum, no_lum_schema, "lum")
    no_history = table.drop_columns(["hist_item_ids", "hist_categories"])
    with pytest.raises(RankerInputError, match="hist_item_ids"):
        validate_training_table(no_history, schema, "lum+pooled")
    with pytest.raises(RankerInputError, match="unknown variant 'lum2'"):
        validate_training_table(table, schema, "lum2")


def test_scoring_table_that_does_not_match_the_schema(table, schema):
    check_table(table, schema, "lum+pooled")
    with pytest.raises(RankerInputError, match="lum_user__surface_search.*surface=search"):
        check_table(table.drop_columns(["lum_user__surface_search"]), schema, "lum")
    with pytest.raises(RankerInputError, match="missing columns: item_ctr"):
        check_table(table.drop_columns(["item_ctr"]), schema, "base")
    with pytest.raises(RankerInputError, match="lum_dim is 4 in the table but the ranker was trained with 8"):
        check_table(with_metadata(table, lum_dim=4), schema, "lum")
    with pytest.raises(RankerInputError, match="model version 'other'"):
        check_table(with_metadata(table, model_version="other"), schema, "lum")
    short = [None if v is None else v[:4] for v in table.column("lum_item").to_pylist()]
    with pytest.raises(RankerInputError, match="lum_item holds vectors of length 4"):
        check_table(replace_column(table.replace_schema_metadata({}), "lum_item", pa.array(short, pa.list_(pa.float32()))), schema, "lum")
    check_table(table.drop_columns(["lum_item"]), schema, "base")  # base does not need it


def test_lightgbm_and_dlrm_share_one_dense_layout(table, schema):
    """Both models' dense columns come from one definition (FeaturePipeline._dense_blocks): every DLRM column but the
    request-similarity flag has a LightGBM twin named from the same parts ('lum_user:s:0' ~ 'lum_user__s__0',
    'counter:c' ~ 'c'), in the same order; the twins hold the same values where neither model transforms them."""
    pipeline = FeaturePipeline.fit(table, schema, "lum+pooled", FeatureConfig(lum_inputs="vectors", request_features=True))
    x, lightgbm_names = pipeline.lightgbm_inputs(table)
    raw, dlrm_names, scaled = pipeline._raw_dense(table)
    kinds = ("counter", "flag", "request")
    twins = {name: "__".join(name.split(":", 1)[1].split(":") if name.split(":")[0] in kinds else name.split(":")) for name in dlrm_names}
    first = list(schema.lum_conditions)[0]
    assert twins["request:lum_sim_request__request_rank"] == "lum_sim_request__request_rank"
    assert twins[f"lum_user:{first}:0"] == f"lum_user__{first}__0" and twins["flag:missing_lum"] == "missing_lum"
    shared = [n for n in dlrm_names if n != "flag:lum_sim_request_missing"]
    assert [lightgbm_names.index(twins[n]) for n in shared] == sorted(lightgbm_names.index(twins[n]) for n in shared)
    for name in shared:
        if not name.startswith(("counter:", "hist_len")):  # the MLP's signed log of the counters and the history length
            np.testing.assert_array_equal(raw[:, dlrm_names.index(name)], x[:, lightgbm_names.index(twins[name])], err_msg=name)
    assert [n for n, s in zip(dlrm_names, scaled) if not s] == [n for n in dlrm_names if n.startswith("flag:")]
