"""Training rankers on the synthetic training set: LUM lift, determinism, save/load/score, the fused DMP path
against the plain reference, time-based validation, and a 2-process torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.synthetic import SyntheticConfig, split_by_time, synthetic_training_set
from ranker.dlrm import DLRMConfig, train_dlrm
from ranker.features import FeatureConfig, FeaturePipeline
from ranker.gbdt import LightGBMConfig
from ranker.metrics import auc
from ranker.schema import METADATA_KEY, FeatureSchema, RankerInputError, read_metadata
from ranker.train import RankerConfig, TrainedRanker, time_split, train_ranker

REPO = Path(__file__).resolve().parents[1]
# small and regularised for 16k training rows: a low table learning rate keeps ids from being memorised
DLRM = DLRMConfig(
    embedding_dim=16, dense_arch_layers=(64,), over_arch_layers=(64, 32), batch_size=256, epochs=4, patience=1,
    embedding_lr=0.003, dense_lr=1e-3, threads=1,
)
LGBM = LightGBMConfig(num_leaves=31, n_estimators=300, early_stopping_rounds=20, threads=1)


def config(model: str, variant: str) -> RankerConfig:
    return RankerConfig(model=model, variant=variant, dlrm=DLRM, lightgbm=LGBM)


@pytest.fixture(scope="module")
def data() -> tuple[pa.Table, pa.Table]:
    """(training window, later test window) of 20,000 synthetic impressions."""
    return split_by_time(synthetic_training_set(SyntheticConfig(rows=20_000)), 0.2)


@pytest.fixture(scope="module")
def rankers(data) -> dict[tuple[str, str], TrainedRanker]:
    train, _ = data
    wanted = [("dlrm", "base"), ("dlrm", "lum"), ("dlrm", "pooled-history"), ("dlrm", "lum+pooled"), ("lightgbm", "base"), ("lightgbm", "lum"),
              ("dlrm", "din+lum"), ("lightgbm", "din+lum")]
    return {key: train_ranker(train, config(*key)) for key in wanted}


def test_auc(ranker: TrainedRanker, table: pa.Table) -> float:
    return auc(table.column("label").to_numpy(), ranker.score(table))


test_auc.__test__ = False  # a helper, not a test


def test_lum_features_beat_base(rankers, data):
    _, test = data
    got = {key: test_auc(r, test) for key, r in rankers.items()}
    print({f"{m}/{v}": round(a, 4) for (m, v), a in got.items()})
    assert got[("dlrm", "lum")] > got[("dlrm", "base")] + 0.05
    assert got[("lightgbm", "lum")] > got[("lightgbm", "base")] + 0.05
    assert got[("dlrm", "pooled-history")] > got[("dlrm", "base")] + 0.01  # the history reveals the taste
    assert got[("dlrm", "lum+pooled")] > got[("dlrm", "pooled-history")] + 0.05  # LUM adds to the history
    assert got[("dlrm", "base")] > 0.6  # the base model learns something too


def test_training_is_deterministic(rankers, data):
    train, test = data
    again = train_ranker(train, config("dlrm", "lum"))
    first = rankers[("dlrm", "lum")]
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("seconds", "examples_per_s")} for e in log]
    assert strip(again.training["log"]) == strip(first.training["log"])
    assert np.array_equal(again.score(test), first.score(test))
    booster = train_ranker(train, config("lightgbm", "lum"))
    assert np.array_equal(booster.score(test), rankers[("lightgbm", "lum")].score(test))


def test_validation_is_the_latest_part_of_the_window(rankers, data):
    train, _ = data
    split = time_split(train, 0.1)
    for ranker in rankers.values():
        assert ranker.training["valid_from"] == str(split.cut)
        assert ranker.training["valid_rows"] == len(split.valid) and ranker.training["fit_rows"] == len(split.fit)
    log = rankers[("dlrm", "lum")].training["log"]
    best = rankers[("dlrm", "lum")].training["best_epoch"]
    assert max(e["valid_auc"] for e in log) == next(e["valid_auc"] for e in log if e["epoch"] == best)
    # vocabularies see only the fitting rows: users that appear only in the validation window are OOV
    fit_users = set(train.take(pa.array(split.fit)).column("user_id").to_pylist())
    assert set(rankers[("dlrm", "lum")].pipeline.vocabularies["user_id"].values) == fit_users


def test_validation_within_epochs_keeps_the_best_checkpoint(data):
    train, _ = data
    split = time_split(train, 0.1)
    fine = replace(config("dlrm", "base"), dlrm=replace(DLRM, epochs=2, evals_per_epoch=3, patience=10))
    ranker = train_ranker(train, fine)
    log = ranker.training["log"]
    assert [e["epoch"] for e in log] == [0.3333, 0.6667, 1, 1.3333, 1.6667, 2]
    assert sum(e["examples"] for e in log) == 2 * len(split.fit)  # every fitting row once per epoch, no batch twice
    best = max(log, key=lambda e: e["valid_auc"])
    assert ranker.training["best_epoch"] == best["epoch"]
    # the weights kept are those of that checkpoint: they score the validation rows with its AUC
    valid = train.take(pa.array(split.valid))
    assert test_auc(ranker, valid) == pytest.approx(best["valid_auc"], abs=1e-6)
    with pytest.raises(ValueError, match="evals_per_epoch"):
        DLRMConfig(evals_per_epoch=0)


@pytest.mark.parametrize("key", [("dlrm", "lum"), ("lightgbm", "lum"), ("dlrm", "pooled-history"), ("dlrm", "din+lum"), ("lightgbm", "din+lum")])
def test_save_load_score_gives_the_same_scores(rankers, data, tmp_path, key):
    _, test = data
    ranker = rankers[key]
    folder = ranker.save(tmp_path / "ranker")
    assert (folder / "ranker.json").exists() and (folder / "features.json").exists()
    assert (folder / ("dlrm.pt" if key[0] == "dlrm" else "lightgbm.txt")).exists()
    loaded = TrainedRanker.load(folder)
    assert loaded.config == ranker.config and loaded.schema == ranker.schema and loaded.variant == key[1]
    expected = ranker.score(test)
    assert np.array_equal(loaded.score(test), expected)
    assert np.array_equal(loaded.score(loaded.featurize(test)), expected)
    frame = test.to_pandas()
    frame.attrs[METADATA_KEY] = read_metadata(test)
    np.testing.assert_allclose(loaded.score(frame), expected, rtol=1e-6)
    facts = json.loads((folder / "ranker.json").read_text())
    assert facts["variant"] == key[1] and facts["schema"]["lum_dim"] == 16


def test_dlrm_without_id_tables_saves_loads_and_scores_the_same(data, tmp_path):
    train, test = data
    cfg = replace(config("dlrm", "lum+pooled"), features=FeatureConfig(dlrm_ids=False), dlrm=replace(DLRM, epochs=2))
    ranker = train_ranker(train, cfg)
    tables = [name for name in ranker.model.state_dict() if name.endswith(".weight") and "embedding_bags" in name]
    assert not any("t_user_id" in t for t in tables) and any("t_item_id" in t for t in tables)  # history items keep theirs
    loaded = TrainedRanker.load(ranker.save(tmp_path / "ranker"))
    assert loaded.config.features.dlrm_ids is False
    assert np.array_equal(loaded.score(test), ranker.score(test))
    assert test_auc(loaded, test) > 0.6


def test_listwise_loss_is_refused_under_torchrun(data, monkeypatch):
    """Each rank takes an equal slice of a batch, which would cut requests apart: refused, not silently wrong."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process only"):
        train_dlrm(None, None, [], replace(DLRM, listwise_weight=1.0))


def test_scoring_a_mismatched_table_fails_clearly(rankers, data):
    _, test = data
    ranker = rankers[("dlrm", "lum")]
    with pytest.raises(RankerInputError, match="missing columns: lum_user__surface_home "):
        ranker.score(test.drop_columns(["lum_user__surface_home"]))
    meta = {**read_metadata(test), "lum_dim": 32}
    with pytest.raises(RankerInputError, match="lum_dim is 32"):
        ranker.score(test.replace_schema_metadata({METADATA_KEY.encode(): json.dumps(meta).encode()}))
    with pytest.raises(RankerInputError, match="missing columns: user_ctr"):
        rankers[("lightgbm", "base")].score(test.drop_columns(["user_ctr"]))
    rankers[("dlrm", "base")].score(test.drop_columns(["lum_item"]))  # base never reads LUM columns


def test_training_with_absent_features_says_what_to_run(data):
    train, _ = data
    no_lum = train.drop_columns([c for c in train.column_names if c.startswith("lum_")])
    with pytest.raises(RankerInputError, match="lum features ingest"):
        train_ranker(no_lum, config("dlrm", "lum"))
    with pytest.raises(RankerInputError, match="hist_item_ids"):
        train_ranker(train.drop_columns(["hist_item_ids"]), config("lightgbm", "pooled-history"))


def test_fused_dmp_path_matches_the_plain_path():
    """The same seeded start and the same batches: DMP's fused row-wise Adagrad + Adam and the unsharded model with
    torchrec's RowWiseAdagrad + Adam end at the same weights."""
    table = synthetic_training_set(SyntheticConfig(rows=3_000, users=200, items=400, lum_dim=8, seed=5))
    pipeline = FeaturePipeline.fit(table, FeatureSchema.from_table(table), "lum+pooled")
    inputs = pipeline.dlrm_inputs(table)
    small = replace(DLRM, embedding_dim=8, dense_arch_layers=(16,), over_arch_layers=(16, 8), epochs=2, embedding_lr=0.05)
    tables = pipeline.embedding_tables(8)
    fused = train_dlrm(inputs, None, tables, replace(small, engine="dmp"))
    plain = train_dlrm(inputs, None, tables, replace(small, engine="plain"))
    assert "fused" in fused.plan and "table_wise" in fused.plan
    assert fused.state.keys() == plain.state.keys()
    for name in fused.state:
        torch.testing.assert_close(fused.state[name], plain.state[name], atol=2e-5, rtol=1e-4, msg=name)
    assert fused.log[-1]["train_loss"] == pytest.approx(plain.log[-1]["train_loss"], abs=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e  # torchrun with two processes
def test_two_process_torchrun_matches_one_process(rankers, data, tmp_path):
    train, test = data
    pq.write_table(train, tmp_path / "train.parquet")
    one = rankers[("dlrm", "lum")]
    (tmp_path / "config.json").write_text(json.dumps(replace(one.config, dlrm=replace(DLRM, threads=None)).to_json()))
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [
            str(torchrun), "--nproc_per_node=2", "--master_port", str(_free_port()), "-m", "ranker.train_dist",
            "--train", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "two"), "--config", str(tmp_path / "config.json"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = TrainedRanker.load(tmp_path / "two")
    assert two.training["world_size"] == 2
    plan = two.training["sharding_plan"]
    assert "rank:0/cpu" in plan and "rank:1/cpu" in plan  # the tables really were spread over both processes
    auc_one, auc_two = test_auc(one, test), test_auc(two, test)
    print(f"1 process {auc_one:.4f}, 2 processes {auc_two:.4f}")
    assert abs(auc_two - auc_one) < 0.02


def test_scoring_a_cold_user_from_a_dataframe(rankers, data):
    """One new user's candidates with no LUM vectors, no history and no counters: every such column is None in
    the DataFrame (pyarrow's null type, not list<float>); it scores like the typed table does."""
    _, test = data
    frame = test.slice(0, 50).to_pandas()
    frame.attrs[METADATA_KEY] = read_metadata(test)
    frame["user_id"] = "a-new-user"
    for name in frame.columns:
        if name.startswith(("lum_user__", "hist_")):
            frame[name] = None
        elif name.startswith("user_"):
            frame[name] = np.nan
    frame["missing_user_stats"] = 1
    typed = pa.Table.from_pandas(frame, schema=test.schema, preserve_index=False)
    for key in (("dlrm", "lum+pooled"), ("lightgbm", "lum")):
        scores = rankers[key].score(frame)
        assert np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
        np.testing.assert_allclose(scores, rankers[key].score(typed), rtol=1e-6)


def test_request_features_score_one_request_from_a_dataframe(data, tmp_path):
    """A ranker with request features scores a request's candidates from a DataFrame (its `ts` tells which rows
    are one request) exactly as from the table, after save and load; without `ts` it says what is missing."""
    train, test = data
    cfg = replace(config("lightgbm", "lum"), features=FeatureConfig(request_features=True))
    ranker = TrainedRanker.load(train_ranker(train, cfg).save(tmp_path / "ranker"))
    request = test.slice(0, 8)
    request = request.set_column(request.column_names.index("ts"), "ts", pa.array([request.column("ts")[0]] * 8, request.schema.field("ts").type))
    request = request.set_column(request.column_names.index("user_id"), "user_id", pa.array(["u1"] * 8))
    frame = request.to_pandas()
    frame.attrs[METADATA_KEY] = read_metadata(test)
    np.testing.assert_allclose(ranker.score(frame), ranker.score(request), rtol=1e-6)
    x, names = ranker.pipeline.lightgbm_inputs(request)
    ranks = x[:, names.index("item_ctr__request_rank")]
    assert sorted(ranks) == sorted(pd.Series(request.column("item_ctr").to_numpy()).rank(ascending=False))
    alone, _ = ranker.pipeline.lightgbm_inputs(request.slice(2, 1))  # without the rest of its slate it is its request's best
    assert alone[0, names.index("item_ctr__request_rank")] == 1 and ranks.max() > 1
    with pytest.raises(RankerInputError, match="request features need column 'ts'"):
        ranker.score(frame.drop(columns=["ts"]))


def test_dcn_interaction_trains(data):
    train, test = data
    dcn = replace(DLRM, interaction="dcn", dcn_layers=2, dcn_low_rank=8, epochs=2)
    ranker = train_ranker(train, RankerConfig(model="dlrm", variant="lum", dlrm=dcn))
    assert type(ranker.model).__name__ == "DLRM_DCN"
    print(f"DCN lum AUC {test_auc(ranker, test):.4f}")
    assert test_auc(ranker, test) > 0.7


def test_listwise_loss_is_each_requests_softmax_cross_entropy():
    """Against a per-request log-softmax written out by hand: clicked rows count, requests with no click or only
    clicks are left out, and adding a constant to one request's logits changes nothing (only the order within a
    request is trained)."""
    from ranker.dlrm import listwise_loss

    logits = torch.tensor([2.0, 0.5, -1.0, 3.0, 1.0, 0.0, 4.0, -2.0, 1.5], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 0, 1, 1], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])  # request 2: no click; request 3: every candidate clicked
    expected = []
    for g in (0, 1):
        rows = groups == g
        log_p = torch.log_softmax(logits[rows], 0)
        expected += [-v for v in log_p[labels[rows] == 1]]
    assert float(listwise_loss(logits, labels, groups)) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-12)
    shifted = logits + torch.where(groups == 1, 100.0, 0.0)
    assert float(listwise_loss(shifted, labels, groups)) == pytest.approx(float(listwise_loss(logits, labels, groups)), rel=1e-9)
    assert float(listwise_loss(logits[5:], labels[5:], groups[5:] - 2)) == 0.0  # nothing to order
    with pytest.raises(ValueError, match="listwise_weight"):
        DLRMConfig(listwise_weight=-1.0)


def test_epoch_batches_keep_requests_whole():
    from ranker.dlrm import epoch_batches

    rng = np.random.default_rng(3)
    groups = np.repeat(rng.permutation(300) * 7, rng.integers(1, 12, 300))  # 300 requests of 1-11 rows, any numbering
    rng.shuffle(groups)
    batches = epoch_batches(len(groups), 64, [0, 1], groups)
    rows = np.concatenate(batches)
    assert np.array_equal(np.sort(rows), np.arange(len(groups)))  # every row once
    owner = {}
    for b, batch in enumerate(batches):
        for g in np.unique(groups[batch]):
            assert owner.setdefault(g, b) == b  # a request never spans two batches
        assert len(batch) < 64 + 11
    assert [len(b) for b in batches[:-1]] != [64] * (len(batches) - 1)  # cut at request ends, not every 64 rows
    again = epoch_batches(len(groups), 64, [0, 1], groups)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = epoch_batches(len(groups), 64, [0, 2], groups)
    assert not np.array_equal(np.concatenate(other), rows)  # each epoch its own request order
    plain = epoch_batches(100, 32, [0, 1])
    assert [len(b) for b in plain] == [32, 32, 32, 4]
    assert np.array_equal(np.concatenate(plain), np.random.default_rng([0, 1]).permutation(100))


def _slates(table: pa.Table, size: int) -> pa.Table:
    """The rows in time order, every `size` consecutive ones made one request (the user and time of its first)."""
    table = table.sort_by("ts")
    first = np.arange(table.num_rows) // size * size
    for column in ("user_id", "ts"):
        values = table.column(column).take(pa.array(first))
        table = table.set_column(table.column_names.index(column), column, values)
    return table


def test_listwise_training_engines_agree_and_order_slates(data):
    """With the listwise term both engines still end at the same weights, and on slates it trains the order within
    a request better than the log loss alone."""
    from ranker.dlrm import listwise_loss
    from ranker.features import request_groups

    train, test = (_slates(t, 8) for t in data)
    table = _slates(synthetic_training_set(SyntheticConfig(rows=3_000, users=200, items=400, lum_dim=8, seed=5)), 6)
    pipeline = FeaturePipeline.fit(table, FeatureSchema.from_table(table), "lum")
    inputs = pipeline.dlrm_inputs(table, with_groups=True)
    assert len(np.unique(inputs.groups)) == 500
    small = replace(DLRM, embedding_dim=8, dense_arch_layers=(16,), over_arch_layers=(16, 8), epochs=2, embedding_lr=0.05, listwise_weight=1.0)
    tables = pipeline.embedding_tables(8)
    fused = train_dlrm(inputs, None, tables, replace(small, engine="dmp"))
    plain = train_dlrm(inputs, None, tables, replace(small, engine="plain"))
    for name in fused.state:
        torch.testing.assert_close(fused.state[name], plain.state[name], atol=2e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="request numbers"):
        train_dlrm(pipeline.dlrm_inputs(table), None, tables, small)

    # on later slates the model trained with the term orders each request's clicks higher: a lower listwise loss
    groups = torch.from_numpy(np.unique(request_groups(test, FeatureSchema.from_table(test)), return_inverse=True)[1].reshape(-1))
    labels = torch.from_numpy(test.column("label").to_numpy().astype(np.float64))

    def slate_loss(weight: float) -> float:
        ranker = train_ranker(train, replace(config("dlrm", "lum"), dlrm=replace(DLRM, listwise_weight=weight)))
        p = np.clip(ranker.score(test), 1e-7, 1 - 1e-7)
        return float(listwise_loss(torch.from_numpy(np.log(p / (1 - p))), labels, groups))

    pointwise, listwise = slate_loss(0.0), slate_loss(1.0)
    print(f"listwise loss on the test slates: log loss only {pointwise:.4f}, + listwise term {listwise:.4f}")
    assert listwise < pointwise - 0.02


@pytest.mark.parametrize("metric", ["auc", "binary_logloss"])
def test_lightgbm_keeps_the_best_iteration_of_its_stopping_metric(data, metric):
    from ranker.gbdt import train_lightgbm

    train, _ = data
    split = time_split(train, 0.1)
    fit, valid = train.take(pa.array(split.fit)), train.take(pa.array(split.valid))
    pipeline = FeaturePipeline.fit(fit, FeatureSchema.from_table(fit), "lum")
    (x_fit, names), (x_valid, _) = pipeline.lightgbm_inputs(fit), pipeline.lightgbm_inputs(valid)
    y_fit, y_valid = fit.column("label").to_numpy(), valid.column("label").to_numpy()
    result = train_lightgbm(x_fit, y_fit, x_valid, y_valid, names, pipeline.lightgbm_categorical, replace(LGBM, early_stopping_metric=metric))
    curve = np.asarray(result.log[metric])
    assert set(result.log) == {"auc", "binary_logloss"}  # both recorded, one decides
    best = int(np.argmax(curve) if metric == "auc" else np.argmin(curve)) + 1
    assert result.best_iteration == best
    assert len(curve) == min(best + LGBM.early_stopping_rounds, LGBM.n_estimators)  # it stopped that many rounds later
    with pytest.raises(ValueError, match="early_stopping_metric"):
        LightGBMConfig(early_stopping_metric="ndcg")


@pytest.mark.parametrize("key", [("dlrm", "lum+pooled"), ("lightgbm", "lum"), ("dlrm", "din+lum"), ("lightgbm", "din+lum")])
def test_an_exported_ranker_scores_as_the_eager_one(rankers, data, tmp_path, key):
    """ranker/export.py: the DLRM as a torch.export program (traced on placeholders, any batch size after) and
    LightGBM's native text model, each with a spec of its inputs."""
    import lightgbm as lgb

    from ranker.export import SPEC_FILE, export_ranker, flat_inputs

    _, test = data
    ranker = rankers[key]
    out = export_ranker(ranker, tmp_path / "exported")
    spec = json.loads((out / SPEC_FILE).read_text())
    inputs = ranker.featurize(test)
    expected = ranker.score(inputs)
    if key[0] == "dlrm":
        program = torch.export.load(out / spec["file"])  # the file this test just wrote
        for rows in (np.arange(len(expected)), np.arange(7)):  # the whole window, and another batch size
            got = program.module()(*flat_inputs(inputs, rows)).detach().numpy()
            np.testing.assert_allclose(got, expected[rows], atol=1e-5, rtol=0)
        assert [d["name"] for d in spec["dense"]] == ranker.pipeline.dense_names
        assert [s["key"] for s in spec["sparse"]] == [f.key for f in ranker.pipeline.sparse_features]
        assert any("history" in s["ids"] for s in spec["sparse"])  # the pooled-history keys are described
        assert spec["dense"][0]["transform"].startswith("sign(x) * log1p(|x|)") and "missing" in spec["inputs"][0]
    else:
        got = lgb.Booster(model_file=str(out / spec["file"])).predict(inputs)
        np.testing.assert_allclose(got, expected, atol=1e-12, rtol=0)
        assert [f["name"] for f in spec["features"]] == ranker.model.feature_name()
        categorical = [f["name"] for f in spec["features"] if f["categorical"]]
        assert categorical == ranker.pipeline.lightgbm_categorical and all(c in spec["vocabularies"] for c in categorical)
        if key[1].startswith("din"):  # the target-aware numbers are described, and the item factors they use are in the spec
            din = [f for f in spec["features"] if f["name"].startswith("din_")]
            assert len(din) == 7 and all("training set holds it" not in f["transform"] for f in din)
            assert spec["item_factors"]["items"] == ranker.pipeline.item_factors.items
    vocabulary = next(iter(spec["vocabularies"].values()))
    assert vocabulary["oov_id"] == 0 and min(vocabulary["ids"].values()) == 1
