"""Target attention (the din variants): the attention unit on hand-built tensors, the age buckets, the per-position
KJT keys, LightGBM's target-aware history numbers, and the DIN DLRM under both engines."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from benchmarks.synthetic import SyntheticConfig, synthetic_training_set
from contracts.names import TRAINING_SET_METADATA_KEY
from ranker.config import DLRMConfig, FeatureConfig
from ranker.din import AGE_EDGES_HOURS, AGE_KEY, DINDLRM, TARGET_CATEGORY_KEY, TARGET_ITEM_KEY, TargetAttention, age_buckets
from ranker.dlrm import train_dlrm
from ranker.features import TARGET_AWARE_NAMES, FeaturePipeline, ItemFactors
from ranker.schema import FeatureSchema, RankerInputError, validate_training_table

SMALL = DLRMConfig(embedding_dim=8, dense_arch_layers=(16,), over_arch_layers=(16, 8), epochs=2, batch_size=512, embedding_lr=0.05)


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return synthetic_training_set(SyntheticConfig(rows=3_000, users=200, items=400, lum_dim=8, seed=5))


@pytest.fixture(scope="module")
def schema(table) -> FeatureSchema:
    return FeatureSchema.from_table(table)


# ---------------------------------------------------------------------------------------------------- the attention unit


@pytest.mark.parametrize("softmax", [False, True])
def test_padding_is_never_attended(softmax):
    torch.manual_seed(0)
    unit = TargetAttention(dim=6, hidden=(8,), age_dim=3, softmax=softmax)
    target = torch.randn(3, 6)
    behaviours = torch.randn(3, 4, 6)
    ages = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [1, 1, 1, 1]])
    lengths = torch.tensor([2, 1, 4])
    interest, weights = unit(target, behaviours, ages, lengths)
    assert interest.shape == (3, 6) and weights.shape == (3, 4)
    assert (weights[0, 2:] == 0).all() and (weights[1, 1:] == 0).all()
    assert (weights[2] != 0).all()
    # whatever sits in the padded positions, the interest does not move
    changed = behaviours.clone()
    changed[0, 2:] = 100.0
    changed[1, 1:] = -50.0
    again, _ = unit(target, changed, ages, lengths)
    torch.testing.assert_close(again, interest)
    if softmax:
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    # an empty history attends nothing: a zero interest, no NaN
    empty, empty_weights = unit(target[:1], behaviours[:1], torch.zeros(1, 4, dtype=torch.long), torch.tensor([0]))
    assert torch.equal(empty, torch.zeros(1, 6)) and torch.equal(empty_weights, torch.zeros(1, 4))


def test_the_behaviour_equal_to_the_target_gets_the_larger_weight_after_training():
    """A toy task: the label says whether the target is among the behaviours; reading it from the interest vector
    needs the attention to single out the behaviour that equals the target."""
    torch.manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    unit = TargetAttention(dim=8, hidden=(16,), age_dim=0)
    readout = torch.nn.Linear(8, 1)
    optimizer = torch.optim.Adam([*unit.parameters(), *readout.parameters()], lr=0.01)

    def batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        history = torch.randint(0, 40, (size, 5), generator=generator)
        target = torch.randint(0, 40, (size,), generator=generator)
        hit = torch.rand(size, generator=generator) < 0.5
        slot = torch.randint(0, 5, (size,), generator=generator)
        history[hit, slot[hit]] = target[hit]
        label = (history == target[:, None]).any(dim=1).float()
        return items[target], items[history], label, history == target[:, None]

    def weight_gap(generator: torch.Generator) -> float:
        target, behaviours, _, match = batch(500, generator)
        with torch.no_grad():
            _, weights = unit(target, behaviours, torch.zeros(500, 5, dtype=torch.long), torch.full((500,), 5))
        rows = match.any(dim=1) & ~match.all(dim=1)
        return float((weights[rows][match[rows]].mean() - weights[rows][~match[rows]].mean()))

    generator = torch.Generator().manual_seed(1)
    before = weight_gap(torch.Generator().manual_seed(2))
    for _ in range(300):
        target, behaviours, label, _ = batch(128, generator)
        interest, _ = unit(target, behaviours, torch.zeros(128, 5, dtype=torch.long), torch.full((128,), 5))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(readout(interest).squeeze(-1), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = weight_gap(torch.Generator().manual_seed(2))
    assert after > 0.5 and after > before + 0.5, (before, after)


def test_age_buckets_follow_the_edges():
    hours = np.array([0.0, 0.99, 1.0, 2.9, 23.9, 24.0, 8759.0, 8760.0, 1e6, -3.0, np.nan])
    got = age_buckets(hours)
    assert got.tolist() == [1, 1, 2, 2, 5, 6, 12, 13, 13, 1, 13]
    assert got.max() == len(AGE_EDGES_HOURS) + 1  # 0 stays the padding id


# ---------------------------------------------------------------------------------------------------- inputs


def test_din_keys_share_the_target_tables_and_carry_ages(table, schema):
    pipeline = FeaturePipeline.fit(table, schema, "din")
    keys = [f.key for f in pipeline.sparse_features]
    assert keys[-5:] == [TARGET_ITEM_KEY, "hist_item_ids", TARGET_CATEGORY_KEY, "hist_categories", AGE_KEY]
    assert "hist_item_ids" not in [f.key for f in pipeline.sparse_features if not f.positional]  # not mean-pooled
    from torchrec import EmbeddingBagConfig, EmbeddingConfig

    tables = pipeline.embedding_tables(4)
    positional = {t.name: list(t.feature_names) for t in tables if isinstance(t, EmbeddingConfig)}
    assert len(positional) + sum(isinstance(t, EmbeddingBagConfig) for t in tables) == len(tables)
    assert positional == {"s_item_id": [TARGET_ITEM_KEY, "hist_item_ids"], "s_item_category": [TARGET_CATEGORY_KEY, "hist_categories"]}

    inputs = pipeline.dlrm_inputs(table)
    at = {k: i for i, k in enumerate(inputs.keys)}
    np.testing.assert_array_equal(inputs.offsets[at[AGE_KEY]], inputs.offsets[at["hist_item_ids"]])
    # the ages are the request time minus each behaviour's time, newest last, in the buckets
    row = int(np.flatnonzero(np.diff(inputs.offsets[at[AGE_KEY]]) >= 3)[0])
    start, end = inputs.offsets[at[AGE_KEY]][row : row + 2]
    request_s = table.column("ts")[row].value / 1e6
    kept = table.column("hist_ts")[row].as_py()[-(end - start):]
    np.testing.assert_array_equal(inputs.ids[at[AGE_KEY]][start:end], age_buckets((request_s - np.array(kept)) / 3600.0))
    # the target's category id is the same id the history's categories get
    vocab = pipeline.vocabularies[schema.category]
    np.testing.assert_array_equal(inputs.ids[at[TARGET_CATEGORY_KEY]], vocab.ids(table.column(schema.category)))


def test_history_times_must_align_with_the_items(table, schema):
    times = table.column("hist_ts").to_pylist()
    row = next(i for i, t in enumerate(times) if len(t) >= 2)
    times[row] = times[row][1:]
    broken = table.set_column(table.column_names.index("hist_ts"), "hist_ts", pa.array(times, pa.list_(pa.float64())))
    pipeline = FeaturePipeline.fit(table, schema, "din")
    with pytest.raises(RankerInputError, match=rf"row {row}: 'hist_ts' holds \d+ times but 'hist_item_ids' \d+ items"):
        pipeline.dlrm_inputs(broken)


def test_a_training_set_without_history_times_says_to_rebuild(table, schema):
    without = table.drop(["hist_ts"])
    with pytest.raises(RankerInputError, match="no 'hist_ts' column.*rebuild the training set"):
        validate_training_table(without, schema, "din")
    validate_training_table(without, schema, "pooled-history")  # the mean-pooled history does not need the times


def _hand_table() -> pa.Table:
    """Two rows of one user at 2025-01-02 00:00 UTC, with a three-item history."""
    request = 1735776000.0  # 2025-01-02T00:00:00Z
    meta = {"context_columns": [], "counter_columns": [], "sequence_columns": ["hist_item_ids", "hist_categories", "hist_ts"], "lum_conditions": {}}
    table = pa.table({
        "user_id": ["u", "u", "v"],
        "item_id": ["a", "z", "a"],
        "ts": pa.array([int(request * 1e6)] * 3, pa.timestamp("us", tz="UTC")),
        "label": pa.array([1, 0, 1], pa.int8()),
        "item_category": ["x", "y", "x"],
        "hist_item_ids": [["a", "b", "c"], ["a", "b", "c"], []],
        "hist_categories": [["x", "y", "x"], ["x", "y", "x"], []],
        "hist_ts": pa.array([[request - 50 * 3600, request - 10 * 3600, request - 2 * 3600]] * 2 + [[]], pa.list_(pa.float64())),
        "missing_user_stats": pa.array([0, 0, 0], pa.int8()),
        "missing_item_stats": pa.array([0, 0, 0], pa.int8()),
    })
    return table.replace_schema_metadata({TRAINING_SET_METADATA_KEY: json.dumps(meta)})


def test_lightgbm_target_aware_history_numbers():
    table = _hand_table()
    schema = FeatureSchema.from_table(table)
    pipeline = FeaturePipeline.fit(table, schema, "din")
    # factors by hand: a and c alike, b orthogonal, z unknown
    pipeline.item_factors = ItemFactors(["a", "b", "c"], np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32))
    x, names = pipeline.lightgbm_inputs(table)
    got = dict(zip(names, x.T))
    assert set(TARGET_AWARE_NAMES) <= set(names)
    # row 0: target a (category x); sims with a, b, c: 1, 0, 0.6
    np.testing.assert_allclose([got[n][0] for n in ("din_sim_max", "din_sim_mean", "din_sim_last5")], [1.0, 1.6 / 3, 1.6 / 3], rtol=1e-6)
    assert got["din_category_count"][0] == 2
    assert got["din_hours_since_category"][0] == pytest.approx(2.0)  # c, 2 hours ago
    assert got["din_hours_since_item"][0] == pytest.approx(50.0)  # a itself, 50 hours ago
    assert got["din_category_share_last5"][0] == pytest.approx(2 / 3)
    # row 1: target z (category y): no factors, never engaged; b is its category's, 10 hours ago
    assert np.isnan([got["din_sim_max"][1], got["din_sim_mean"][1], got["din_hours_since_item"][1]]).all()
    assert got["din_category_count"][1] == 1 and got["din_hours_since_category"][1] == pytest.approx(10.0)
    # row 2: no history at all
    assert np.isnan([got[n][2] for n in ("din_sim_max", "din_hours_since_category", "din_hours_since_item", "din_category_share_last5")]).all()
    assert got["din_category_count"][2] == 0


def test_item_factors_never_learn_from_behaviours_inside_the_fitting_window():
    """A behaviour inside the window is some fitting row's label: the factors only see those before its first row."""
    table = _hand_table()
    # row 0's history: a (50 h before the rows), b (10 h), c (2 h); move the window start to 20 h before the rows
    start = table.column("ts")[0].value - 20 * 3600 * 10**6
    early = pa.table({**{n: table.column(n).slice(0, 1) for n in table.column_names}})
    early = early.set_column(early.column_names.index("ts"), "ts", pa.array([start], pa.timestamp("us", tz="UTC")))
    early = early.set_column(early.column_names.index("user_id"), "user_id", pa.array(["w"]))
    both = pa.concat_tables([table, early.cast(table.schema)]).replace_schema_metadata(table.schema.metadata)
    used = ItemFactors.engagements_before(both, FeatureSchema.from_table(both))
    assert sorted(map(tuple, used.to_numpy().tolist())) == [("u", "a"), ("w", "a")]  # b and c: inside the window
    # with the window starting at the rows' own time every history item was engaged before it
    used = ItemFactors.engagements_before(table, FeatureSchema.from_table(table))
    assert sorted(map(tuple, used.to_numpy().tolist())) == [("u", "a"), ("u", "b"), ("u", "c")]


def test_din_lum_compares_the_behaviours_with_the_target_through_the_lms_item_vectors(table, schema):
    assert "din_lm_sim_max" not in FeaturePipeline.fit(table, schema, "din+lum").lightgbm_inputs(table)[1]  # off by default
    pipeline = FeaturePipeline.fit(table, schema, "din+lum", FeatureConfig(din_lm_similarity=True))
    x, names = pipeline.lightgbm_inputs(table)
    at = names.index("din_lm_sim_max")
    assert names[at : at + 3] == ["din_lm_sim_max", "din_lm_sim_mean", "din_lm_sim_last5"]
    # one row by hand: cosine of the row's own LUM item vector with each history item's vector from the table
    lookup = pipeline.lm_item_vectors
    row = next(i for i in range(table.num_rows) if table.column("lum_item")[i].is_valid
               and any(h in lookup.items for h in table.column("hist_item_ids")[i].as_py()))
    target = np.asarray(table.column("lum_item")[row].as_py(), dtype=np.float64)
    history = lookup.vectors(pa.array(table.column("hist_item_ids")[row].as_py()[-pipeline.config.history_len:]))
    cosines = history @ (target / np.linalg.norm(target))
    assert x[row, names.index("din_lm_sim_max")] == pytest.approx(np.nanmax(cosines), abs=1e-5)
    assert x[row, names.index("din_lm_sim_mean")] == pytest.approx(np.nanmean(cosines), abs=1e-5)
    # saved and loaded with the pipeline
    again = FeaturePipeline.from_json(json.loads(json.dumps(pipeline.to_json())), schema)
    np.testing.assert_array_equal(again.lightgbm_inputs(table)[0], x)


def test_item_factors_put_co_engaged_items_together(table, schema):
    factors = ItemFactors.fit(table, schema)
    vectors = factors.vectors(pa.array(factors.items[:50]))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isnan(factors.vectors(pa.array(["never-seen"]))).all()
    again = ItemFactors.from_json(json.loads(json.dumps(factors.to_json())))
    np.testing.assert_allclose(again.vectors(pa.array(factors.items[:50])), vectors, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- the model


def test_din_dlrm_fused_dmp_matches_the_plain_path(table, schema):
    """Both collections (pooled and per-position) on DMP's fused row-wise Adagrad end where the unsharded model with
    torchrec's RowWiseAdagrad does, from the same seeded start and batches."""
    pipeline = FeaturePipeline.fit(table, schema, "din+lum")
    inputs = pipeline.dlrm_inputs(table)
    tables = pipeline.embedding_tables(8)
    fused = train_dlrm(inputs, None, tables, replace(SMALL, engine="dmp"))
    plain = train_dlrm(inputs, None, tables, replace(SMALL, engine="plain"))
    assert "s_item_id" in fused.plan and "fused" in fused.plan
    assert fused.state.keys() == plain.state.keys()
    assert any(k.startswith("sequence_arch.") for k in fused.state) and any(k.startswith("attention.") for k in fused.state)
    for name in fused.state:
        torch.testing.assert_close(fused.state[name], plain.state[name], atol=5e-5, rtol=1e-4, msg=name)


def test_din_dlrm_takes_the_interest_as_one_more_interaction_feature(table, schema):
    from ranker.dlrm import build_dlrm

    pipeline = FeaturePipeline.fit(table, schema, "din")
    model = build_dlrm(pipeline.embedding_tables(8), len(pipeline.dense_names), SMALL)
    assert isinstance(model, DINDLRM)
    dense, kjt, _ = pipeline.dlrm_inputs(table).batch(np.arange(64))
    assert model(dense, kjt).shape == (64, 1)
    # F pooled features + the interest: the dot interaction reads choose(F + 2, 2) pairs beside the dense vector
    pooled = len(model.bag_keys)
    assert model.over_arch.model[0]._mlp[0]._linear.in_features == 8 + (pooled + 2) * (pooled + 1) // 2
