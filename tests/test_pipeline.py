"""`lum run` end to end on the tiny simulator (torch engine), resume after a failure, and the ranker CLI's errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from lum.embed_job import EmbedJobConfig
from lum.evaluate import EvalConfig
from lum.pretrain import PretrainConfig
from lum.tokenizer import TokenizerConfig
from pipelines.cli import main
from pipelines.data.split import SplitConfig
from pipelines.run.config import ConfigError, load_run_config
from ranker.dlrm import DLRMConfig
from ranker.features import FeatureConfig
from ranker.gbdt import LightGBMConfig

# `tiny_run` (a finished `lum run` of TINY_RUN, shared with tests/test_serve.py) lives in tests/conftest.py


def test_run_writes_every_step_and_the_report(tiny_run):
    run, _, output = tiny_run
    state = json.loads((run / "run_state.json").read_text())
    steps = state["steps"]
    for name in ("data", "global+rolling: pretrain", "global+rolling: embed", "global+rolling: features",
                 "global+rolling: dlrm lum", "global+rolling: lightgbm base", "global+rolling: score test window", "report"):
        assert steps[name]["status"] == "done", name
    scored = pq.read_table(run / "scores" / "global.parquet").to_pandas()
    test = pq.read_table(run / "splits" / "global" / "test.parquet")
    assert len(scored) == test.num_rows
    assert {"score__dlrm__base", "score__dlrm__lum", "score__lightgbm__base", "score__lightgbm__lum"} <= set(scored.columns)
    assert scored[[c for c in scored.columns if c.startswith("score__")]].notna().all().all()
    for name in ("report.html", "report.json", "report.md"):
        assert (run / "report" / name).stat().st_size > 500
    report = json.loads((run / "report" / "report.json").read_text())
    assert "global+rolling" in json.dumps(report)
    # the LM of a semantic-id run is evaluated as a retriever
    assert steps["global+rolling: evaluate LM"]["status"] == "done"
    evaluation = json.loads((run / "evaluations" / "global-tiny.json").read_text())
    assert evaluation["item_tokenization"] == "semantic" and evaluation["target_not_generable"] == 0.0
    # `retrieval: {enabled: false}` (TINY_RUN): no A/B step, no retrieval section; the A/B has its own test below
    assert "global+rolling: retrieval A/B" not in steps and not (run / "retrieval").exists()
    assert "retrieval" not in report["meta"] and "Retrieval (simulated)" not in (run / "report" / "report.md").read_text()


def test_the_retrieval_ab_step_adds_the_reports_retrieval_section_to_a_copy_of_the_run(tiny_run, tmp_path):
    """The one test that runs the retrieval A/B (off in TINY_RUN; tests/test_run_ops.py checks that `retrieval.enabled`
    plans the step after the rankers): the step on a copy of the shared run, as `lum run` calls it, then `lum report`.
    The A/B's table is the report's retrieval section and every trained ranker orders every candidate set.

    The step is called directly: `lum run` on a copied folder would redo the features step and everything after it,
    whose recorded settings name the original folder (the embeddings folder's absolute path)."""
    from pipelines.paths import RunPaths
    from pipelines.steps.retrieval import retrieval_ab_step

    run, _, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    paths = RunPaths(copy)
    rankers = [(m, v) for m in ("dlrm", "lightgbm") for v in ("base", "lum")]
    made = retrieval_ab_step(paths, "global", paths.model_dir("global", "tiny"), 300, 20, 20, "torch", rankers, progress=False)
    retrieval = json.loads((copy / "retrieval" / "global.json").read_text())
    assert retrieval == json.loads(json.dumps(made)) and retrieval["settings"]["requests"] == 300
    sets = {r["candidates"]: r for r in retrieval["rows"]}
    assert set(sets) == {"logged", "logged + LUM", "logged + popularity"} and all(r["requests"] == 300 for r in retrieval["rows"])
    assert sets["logged + LUM"]["mean_size"] > sets["logged"]["mean_size"] and sets["logged + LUM"]["recall"] >= sets["logged"]["recall"]
    ranked = {(r["ranker"], r["candidates"]) for r in retrieval["ranked"]}  # every trained ranker orders every set
    assert ranked == {(f"{m}/{v}", c) for m, v in rankers for c in sets}
    assert all(0 < r["ctr@10"] < 1 for r in retrieval["ranked"])
    # the report built from the run folder shows it
    result = CliRunner().invoke(main, ["report", "--run", str(copy)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((copy / "report" / "report.json").read_text())
    assert report["meta"]["retrieval"]["global"]["rows"] == retrieval["rows"]
    assert "Retrieval (simulated): global split" in (copy / "report" / "report.md").read_text()
    assert not (run / "retrieval").exists()  # the shared run is untouched

def test_a_time_consistent_split_keeps_every_event_from_the_test_start_on_out_of_lm_pretraining(tiny_run):
    """The global split (time-consistent): the LM's pretraining window, its tokenizer's items and what the manifest
    says it trained on all end strictly before the earliest test row; the per-user split does not promise this
    (its report says so)."""
    from pipelines.paths import RunPaths

    run, _, _ = tiny_run
    paths = RunPaths(run)
    test_start = pq.read_table(paths.split_file("global", "test"), columns=["ts"]).column("ts").to_pandas().min()
    pretrain = pq.read_table(paths.split_file("global", "pretrain"), columns=["ts", "item_id"]).to_pandas()
    assert pretrain["ts"].max() < test_start
    manifest = json.loads((paths.model_dir("global", "tiny") / "lum_manifest.json").read_text())
    assert pd.Timestamp(manifest["training_window"]["ts_max"]) < test_start
    # the tokenizer (items, conditions, semantic codebooks over item content) is fitted inside pretraining on these
    # same events: the manifest counts exactly the pretraining window's
    assert manifest["training_window"]["events"] == len(pretrain)


def test_the_online_store_answers_right_after_a_run(tiny_run):
    """`lum run` ends by materializing the online store: the test window's last user has vectors and counters there."""
    from feature_store.online import FeatureClient

    run, _, _ = tiny_run
    steps = json.loads((run / "run_state.json").read_text())["steps"]
    assert steps["online store"]["status"] == "done" and list(steps)[-2:] == ["online store", "report"]
    scored = pq.read_table(run / "scores" / "global.parquet", columns=["user_id", "item_id", "ts"]).to_pandas()
    last = scored.sort_values("ts").iloc[-1]
    client = FeatureClient(run / "feature_repo")
    answer = client.get_ranking_features(str(last.user_id), None, [str(last.item_id), "no-such-item"])
    assert answer.user_vector_found.any() and answer.item_vector_found.tolist() == [True, False]
    assert answer.user_vectors.shape[1] == answer.item_vectors.shape[1] > 0


def test_rerun_skips_finished_steps_and_resumes_a_failed_one(tiny_run, tmp_path):
    """On a copy of the shared run (a run folder resumes where it was copied or moved: its steps record paths
    relative to it): finished steps are reused, the removed ranker is trained again."""
    original, config, _ = tiny_run
    run = tmp_path / "copy"
    shutil.copytree(original, run)
    copied = tmp_path / "copy.yaml"
    copied.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "run_dir": str(run)}))
    before = json.loads((run / "run_state.json").read_text())["steps"]
    shutil.rmtree(run / "rankers" / "global-dlrm-lum")  # as if that step had failed midway
    result = CliRunner().invoke(main, ["run", "--config", str(copied)])
    assert result.exit_code == 0, result.output
    assert "dlrm/lum: trained" in result.output
    assert "dlrm/base: up to date" in result.output and "lightgbm/lum: up to date" in result.output
    assert "skipped" in result.output  # data, split and pretraining were not redone
    # steps that were not redone keep the durations of the run that did them; the retrained one is re-timed
    after = json.loads((run / "run_state.json").read_text())["steps"]
    for name in ("data", "global+rolling: split", "global+rolling: pretrain", "global+rolling: dlrm base", "global+rolling: features", "online store"):
        assert after[name] == {"status": "done", "settings": before[name]["settings"], "values": before[name]["values"],
                               "seconds": before[name]["seconds"], "reused": True}, name
    assert "reused" not in after["global+rolling: dlrm lum"] and after["global+rolling: dlrm lum"]["status"] == "done"
    assert "reused" not in after["report"]


def test_lum_status_lists_each_step_with_its_state_settings_hash_and_duration(tiny_run):
    run, _, _ = tiny_run
    result = CliRunner().invoke(main, ["status", "--run", str(run), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["step"]: r for r in json.loads(result.output)}
    assert rows["global+rolling: pretrain"]["state"] == "done" and len(rows["global+rolling: pretrain"]["settings"]) == 12
    assert rows["global+rolling: dlrm lum"]["settings"] != rows["global+rolling: dlrm base"]["settings"]  # other variant, other settings
    table = CliRunner().invoke(main, ["status", "--run", str(run)]).output
    assert "global+rolling: lightgbm lum" in table and "done" in table
    missing = CliRunner().invoke(main, ["status", "--run", str(run / "models")])
    assert missing.exit_code != 0 and "no run_state.json" in missing.output


def test_lum_pretrain_builds_the_model_lum_run_builds_from_the_same_settings(tiny_run, tmp_path):
    """The CLI's options and the run config's lm: section are made from the same dataclasses: the same settings
    give the same PretrainConfig / TokenizerConfig, and `lum pretrain` on the same data the very same model."""
    from pipelines.cli.lm import pretrain_command, pretrain_configs

    run, config, _ = tiny_run
    lm = load_run_config(config).lm
    args = ["--preset", "tiny", "--epochs", "2", "--rows-per-batch", "4", "--threads", "1", "--item-tokenization", "semantic", "--vector-column", "content",
            "--categorical-column", "category", "--semantic-codebook-size", "16", "--semantic-levels", "2"]
    params = dict(pretrain_command.make_context("pretrain", [*args, "--run", str(tmp_path)]).params)
    assert pretrain_configs(params) == (lm.pretrain, lm.tokenizer)
    # `lum pretrain` into a second run folder holding the same data and split
    other = tmp_path / "other"
    runner = CliRunner()
    assert runner.invoke(main, ["data", "make", "--preset", "tiny", "--run", str(other)]).exit_code == 0
    assert runner.invoke(main, ["data", "split", "--run", str(other)]).exit_code == 0
    result = runner.invoke(main, ["pretrain", *args, "--run", str(other)])
    assert result.exit_code == 0, result.output
    ours, theirs = run / "models" / "global-tiny", other / "models" / "global-tiny"
    manifest = lambda folder: json.loads((folder / "lum_manifest.json").read_text())  # noqa: E731
    assert manifest(ours)["model_version"] == manifest(theirs)["model_version"]
    assert manifest(ours)["tokenizer_fingerprint"] == manifest(theirs)["tokenizer_fingerprint"]
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    # and the run's own folder is recognised as made with these settings, but not with others
    again = runner.invoke(main, ["pretrain", *args, "--run", str(run)])
    assert again.exit_code == 0 and "already holds a model trained with these settings" in again.output
    other_settings = runner.invoke(main, ["pretrain", *args, "--min-item-count", "3", "--run", str(run)])
    assert other_settings.exit_code != 0 and "lm.tokenizer.min_item_count: the model has 5, the config asks 3" in other_settings.output


def test_scoring_the_test_window_reuses_the_evaluation_scores_only_while_ranker_and_test_set_match(tiny_run, tmp_path):
    from pipelines.paths import RunPaths
    from pipelines.steps.rankers import ranker_dir, score_test_window, test_scores_file
    from ranker.train import TrainedRanker

    run = shutil.copytree(tiny_run[0], tmp_path / "run")  # its kept scores are rewritten below
    paths = RunPaths(run)
    test = pq.read_table(sorted((run / "training_sets").glob("global-test-*.parquet"))[0])
    scored = pq.read_table(run / "scores" / "global.parquet").to_pandas()
    # what the evaluate step kept is exactly what each ranker scores now, and the scored window holds it
    for model, variant in (("dlrm", "lum"), ("lightgbm", "base")):
        saved = pq.read_table(test_scores_file(paths, "global", model, variant)).column("score").to_numpy()
        fresh = TrainedRanker.load(ranker_dir(paths, "global", model, variant)).score(test)
        assert saved == pytest.approx(fresh, rel=1e-6)
        assert scored[f"score__{model}__{variant}"].to_numpy() == pytest.approx(fresh, rel=1e-6)
    kept = test_scores_file(paths, "global", "lightgbm", "lum")
    original = pq.read_table(kept)
    # same stamp, other values: reused as they are (nothing is scored twice)
    same_stamp = pa.table({"score": np.full(original.num_rows, 0.25)}).replace_schema_metadata(original.schema.metadata)
    pq.write_table(same_stamp, kept)
    assert (pq.read_table(score_test_window(paths, "global", progress=False)).column("score__lightgbm__lum").to_numpy() == 0.25).all()
    # a stamp of another ranker: scored again
    stale = {b"lum.scores": json.dumps({"ranker": "0" * 16, "test_set": "x"}).encode()}
    pq.write_table(pa.table({"score": np.full(original.num_rows, 0.25)}).replace_schema_metadata(stale), kept)
    rescored = pq.read_table(score_test_window(paths, "global", progress=False)).column("score__lightgbm__lum").to_numpy()
    assert rescored == pytest.approx(scored["score__lightgbm__lum"].to_numpy(), rel=1e-6)


def test_lum_demo_runs_what_configs_demo_yaml_says():
    from pipelines.cli.run import demo_config
    from pipelines.run.config import config_dict

    assert config_dict(demo_config()) == config_dict(load_run_config(Path(__file__).parents[1] / "configs" / "demo.yaml"))


def test_run_config_sections_reach_the_ranker_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"rankers": {"features": {"dlrm_ids": False}, "dlrm": {"patience": 0, "evals_per_epoch": 3, "listwise_weight": 0.5},
                                                "lightgbm": {"early_stopping_metric": "binary_logloss"}}}))
    rk = load_run_config(path).rankers
    assert rk.ranker_config("dlrm", "lum").features.dlrm_ids is False
    assert rk.ranker_config("lightgbm", "lum").lightgbm.early_stopping_metric == "binary_logloss"
    dlrm = rk.ranker_config("dlrm", "lum").dlrm
    assert (dlrm.patience, dlrm.evals_per_epoch, dlrm.listwise_weight) == (0, 3, 0.5)
    default = load_run_config(None).rankers.ranker_config("dlrm", "lum")
    assert default.dlrm == DLRMConfig() and default.features.dlrm_ids is True  # one definition: the component's own defaults
    for bad, message in (({"lightgbm": {"early_stopping_metric": "ndcg"}},
                          r"rankers\.lightgbm\.early_stopping_metric: Input should be 'auc' or 'binary_logloss'"),
                         ({"dlrm": {"listwise_weight": -1}}, r"rankers\.dlrm\.listwise_weight: Input should be greater than or equal to 0 \(got -1\)")):
        path.write_text(yaml.safe_dump({"rankers": bad}))
        with pytest.raises(ConfigError, match=message):  # when the config is read, before any step runs
            load_run_config(path)


def test_run_config_defaults_are_the_components_own():
    config = load_run_config(None)
    assert config.lm.pretrain == PretrainConfig() and config.lm.tokenizer == TokenizerConfig() and config.lm.evaluate == EvalConfig()
    assert config.embed.job == EmbedJobConfig() and config.rankers.features == FeatureConfig() and config.rankers.lightgbm == LightGBMConfig()
    assert config.protocols[0].fractions == SplitConfig().fractions


@pytest.mark.parametrize("data, message", [
    ({"lm": {"pretrain": {"epoch": 3}}}, r"lm\.pretrain\.epoch: unknown key; did you mean `epochs`\?"),
    ({"lm": {"epochs": 3}}, r"lm\.epochs: unknown key; `epochs` is a key of lm\.pretrain, lm\.evaluate\.sasrec_model, rankers\.dlrm"),
    ({"lm": {"pretrain": {"epochs": "ten"}}}, r"lm\.pretrain\.epochs: Input should be a valid integer.*\(got 'ten'\)"),
    ({"lm": {"pretrain": {"epochs": 0}}}, r"lm\.pretrain\.epochs: Input should be greater than or equal to 1 \(got 0\)"),
    ({"lm": {"tokenizer": {"semantic_levels": 9}}}, r"lm\.tokenizer\.semantic_levels: Input should be less than or equal to 8"),
    ({"embed": {"job": {"engine": "onnx"}}}, r"embed\.job\.engine: Input should be 'vllm' or 'torch'"),
    ({"embed": {"job": {"conditions": "surface=home"}}}, r"set the query conditions in embed\.conditions"),
    ({"protocols": [{"split": "global"}, {"split": "global"}]}, "two protocols on split global with the same features"),
    ({"protocols": [{"snapshot_every": "daily"}]}, "snapshot_every must be a pandas frequency"),
    ({"data": {"source": "movielens"}}, "data.path must name a MovieLens folder"),
    ({"rankers": {"variants": ["lum+magic"]}}, "magic"),
    ([1, 2], "must be a mapping"),
])
def test_run_config_errors_name_the_key(tmp_path, data, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_run_config(bad)


@pytest.mark.e2e  # data make, split and a Feast repo through the CLI
def test_ranker_cli_says_what_to_run_when_lum_features_were_never_ingested(tmp_path):
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(main, ["data", "make", "--preset", "tiny", "--run", str(run)]).exit_code == 0
    assert runner.invoke(main, ["data", "split", "--protocol", "global", "--run", str(run)]).exit_code == 0
    result = runner.invoke(main, ["ranker", "train", "--variant", "lum", "--run", str(run)])
    assert result.exit_code == 1 and "lum features apply" in result.output  # no feature repo yet
    assert runner.invoke(main, ["features", "apply", "--run", str(run)]).exit_code == 0
    result = runner.invoke(main, ["ranker", "train", "--variant", "lum", "--epochs", "1", "--run", str(run)])
    assert result.exit_code == 1 and "lum features ingest" in result.output
    result = runner.invoke(main, ["ranker", "evaluate", "--run", str(run)])
    assert result.exit_code == 1 and "lum ranker train" in result.output


def test_ranker_score_reads_offline_and_online_features(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run[0], tmp_path / "run")  # materialized again below
    test = pq.read_table(run / "splits" / "global" / "test.parquet").slice(0, 40)
    requests = tmp_path / "requests.parquet"
    pq.write_table(test.select(["user_id", "item_id", "ts", "surface", "device", "daypart", "hour"]), requests)
    runner = CliRunner()
    ranker = run / "rankers" / "global-dlrm-lum"
    offline = runner.invoke(main, ["ranker", "score", "--run", str(run), "--ranker", str(ranker), "--requests", str(requests),
                                   "--out", str(tmp_path / "offline.parquet")])
    assert offline.exit_code == 0, offline.output
    scored = pq.read_table(tmp_path / "offline.parquet").to_pandas()
    # the offline route is the training-set join: the same scores as the scored test window
    window = pq.read_table(run / "scores" / "global.parquet").to_pandas().iloc[:40]
    assert scored.score.to_numpy() == pytest.approx(window.score__dlrm__lum.to_numpy(), rel=1e-5)
    assert runner.invoke(main, ["features", "materialize", "--run", str(run)]).exit_code == 0
    # the online store holds the newest values: past requests are refused (their counters would come from their future) ...
    past = runner.invoke(main, ["ranker", "score", "--run", str(run), "--ranker", str(ranker), "--requests", str(requests),
                                "--source", "online", "--out", str(tmp_path / "online.parquet")])
    assert past.exit_code == 1 and "counters from its future" in past.output and "--source offline" in past.output
    # ... and requests of now (no ts) are scored from it
    pq.write_table(test.select(["user_id", "item_id", "surface", "device", "daypart", "hour"]), requests)
    online = runner.invoke(main, ["ranker", "score", "--run", str(run), "--ranker", str(ranker), "--requests", str(requests),
                                  "--source", "online", "--out", str(tmp_path / "online.parquet")])
    assert online.exit_code == 0, online.output
    scores = pq.read_table(tmp_path / "online.parquet").column("score").to_numpy()
    assert len(scores) == 40 and ((scores > 0) & (scores < 1)).all()
    bad = tmp_path / "bad.parquet"
    pq.write_table(test.select(["user_id", "item_id", "ts"]), bad)
    result = runner.invoke(main, ["ranker", "score", "--run", str(run), "--ranker", str(ranker), "--requests", str(bad), "--out", str(tmp_path / "x.parquet")])
    assert result.exit_code == 1 and "surface" in result.output


def test_quality_benchmark_recomputes_the_runs_lum_columns_and_writes_its_curves(tiny_run, tmp_path, monkeypatch):
    """bench_quality's LUM columns from the run's own LM at the run's history length are the training set's own
    (embedding job + feature store); a shorter history changes them; the benchmark writes its rows and plot."""
    import numpy as np
    import pandas as pd

    import benchmarks.bench_quality as quality
    import benchmarks.common as common
    from pipelines.data.contract import read_events
    from ranker.schema import FeatureSchema

    run, _, _ = tiny_run
    train = pq.read_table(next((run / "training_sets").glob("global-train-*.parquet")))
    events = pd.concat([read_events(run / "splits" / "global" / f"{w}.parquet")[0].to_pandas() for w in ("pretrain", "train", "test")])
    schema = FeatureSchema.from_table(train)
    model = run / "models" / "global-tiny"
    again = quality.lum_columns(model, train, events, schema, history=100)
    for column in [c for c in train.column_names if c.startswith("lum_user__")] + ["lum_item"]:
        old, new = train.column(column).to_pylist(), again.column(column).to_pylist()
        assert [v is None for v in old] == [v is None for v in new], column
        have = [i for i, v in enumerate(old) if v is not None]
        assert len(have) > 100
        np.testing.assert_allclose(np.array([new[i] for i in have]), np.array([old[i] for i in have]), atol=2e-2, rtol=2e-2)
    short = quality.lum_columns(model, train, events, schema, history=1)
    column = next(c for c in train.column_names if c.startswith("lum_user__"))
    pairs = [(a, b) for a, b in zip(train.column(column).to_pylist(), short.column(column).to_pylist()) if a is not None]
    assert np.mean([not np.allclose(a, b, atol=2e-2) for a, b in pairs]) > 0.3  # longer histories are cut to one behaviour

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(quality, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr("sys.argv", ["bench_quality", "--run", str(run), "--presets", "tiny", "--histories", "1,100",
                                     "--users", "200", "--bootstrap", "20"])
    quality.main()
    rows = json.loads((tmp_path / "quality-run.json").read_text())["rows"]
    assert [(r["curve"], r["history"]) for r in rows] == [("preset", 100), ("history", 1), ("history", 100)]
    for r in rows:
        assert r["low"] <= r["gauc_lift"] <= r["high"] and r["lum_gauc"] == pytest.approx(r["base_gauc"] + r["gauc_lift"], abs=2e-4)
    assert rows[0]["gauc_lift"] == rows[2]["gauc_lift"]  # the same LM, history and sample: one point on both curves
    assert (tmp_path / "quality-run.png").stat().st_size > 5000


def test_a_changed_lm_section_is_an_error_not_a_silently_reused_model(tiny_run, tmp_path):
    _, config, _ = tiny_run
    run = shutil.copytree(tiny_run[0], tmp_path / "run")  # its run_state.json is rewritten below
    changes = [({"pretrain": {"epochs": 3}, "tokenizer": {"item_tokenization": "id"}},
                ["lm.pretrain.epochs: 2 before, 3 now", "lm.tokenizer.item_tokenization: 'semantic' before, 'id' now"]),
               ({"tokenizer": {"semantic_levels": 3}}, ["lm.tokenizer.semantic_levels: 2 before, 3 now"])]
    for change, expected in changes:
        changed = {**yaml.safe_load(config.read_text()), "run_dir": str(run)}
        changed["lm"] = {section: {**changed["lm"].get(section, {}), **change.get(section, {})} for section in ("pretrain", "tokenizer")}
        other = tmp_path / "changed.yaml"
        other.write_text(yaml.safe_dump(changed))
        result = CliRunner().invoke(main, ["run", "--config", str(other)])
        assert result.exit_code != 0
        message = result.output + str(result.exception)
        assert "the step 'global+rolling: pretrain' ran with other settings" in message and "lum run --force" in message
        for line in expected:
            assert line in message
    # a folder the state file does not describe (copied, or made before settings were recorded): the model's own check
    state = json.loads((run / "run_state.json").read_text())
    stripped = {**state, "steps": {k: {kk: vv for kk, vv in v.items() if kk != "values"} for k, v in state["steps"].items()}}
    (run / "run_state.json").write_text(json.dumps(stripped))
    result = CliRunner().invoke(main, ["run", "--config", str(other)])
    assert result.exit_code != 0 and "pretrained with other LM settings" in result.output + str(result.exception)


def test_lum_run_force_redoes_only_the_steps_whose_settings_changed(tiny_run, tmp_path):
    """A changed ranker setting: an error naming it; with --force those rankers are retrained, nothing upstream is
    redone and the other model's rankers are reused. On a copy of the shared run (a copied run folder resumes)."""
    original, original_config, _ = tiny_run
    run = tmp_path / "copy"
    shutil.copytree(original, run)
    config = tmp_path / "copy.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(original_config.read_text()), "run_dir": str(run)}))
    changed = yaml.safe_load(config.read_text())
    changed["rankers"]["lightgbm"] = {**changed["rankers"]["lightgbm"], "num_leaves": 7}
    other = config.with_name("leaves.yaml")
    other.write_text(yaml.safe_dump(changed))
    refused = CliRunner().invoke(main, ["run", "--config", str(other)])
    assert refused.exit_code != 0
    assert "global+rolling: lightgbm base" in refused.output and "rankers.lightgbm.num_leaves" not in refused.output
    assert "ranker.lightgbm.num_leaves: 63 before, 7 now" in refused.output
    model_before = (run / "rankers" / "global-lightgbm-lum" / "lum_step.json").read_text()
    forced = CliRunner().invoke(main, ["run", "--config", str(other), "--force"])
    assert forced.exit_code == 0, forced.output + repr(forced.exception)
    assert "lightgbm/base: trained" in forced.output and "lightgbm/lum: trained" in forced.output
    assert "dlrm/base: up to date" in forced.output and "dlrm/lum: up to date" in forced.output
    # the two LightGBM rankers; nothing else (the retrieval A/B, off here, reads the rankers too: tests/test_run_ops.py)
    assert forced.output.count("redone (--force)") == 2 and "retrieval A/B" not in forced.output
    assert (run / "rankers" / "global-lightgbm-lum" / "lum_step.json").read_text() != model_before
    assert (original / "rankers" / "global-lightgbm-lum" / "lum_step.json").read_text() == model_before  # the shared run untouched


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-log"


@pytest.mark.e2e  # a whole `lum run` of examples/tiny-log
def test_your_own_csv_log_runs_end_to_end_from_a_run_config_and_its_report_can_be_rebuilt(tmp_path, monkeypatch):
    """examples/tiny-log: a CSV with its own column names, mapped onto the contract, from `lum run` to the report."""
    monkeypatch.chdir(EXAMPLE.parents[1])  # the example's paths are relative to the repository root, as its comment says
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["--no-progress", "run", "--config", str(EXAMPLE / "run.yaml"), "--run", str(run)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    info = json.loads((run / "data" / "dataset.json").read_text())
    assert info["source"]["name"] == "files" and info["source"]["column_map"] == {"uid": "user_id", "item": "item_id", "time": "ts", "clicked": "label"}
    assert info["n_events"] == 10_580 and info["n_rejected"] == 0
    events = pq.read_table(run / "data" / "events.parquet")
    assert {"user_id", "item_id", "ts", "label", "surface", "device", "hour"} <= set(events.column_names)
    assert str(events.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    steps = json.loads((run / "run_state.json").read_text())["steps"]
    assert all(s["status"] == "done" for s in steps.values()) and "global+rolling: lightgbm lum" in steps
    report = json.loads((run / "report" / "report.json").read_text())
    variants = {v["column"]: v for v in report["protocols"][0]["variants"]}
    from contracts.names import VARIANTS

    assert set(variants) == {f"score__{m}__{v}" for m in ("dlrm", "lightgbm") for v in VARIANTS}  # every variant by default
    assert all(0.0 < v["auc"]["low"] <= v["auc"]["value"] <= v["auc"]["high"] < 1.0 for v in variants.values())
    # `lum report` builds the same report again from the run folder alone
    again = CliRunner().invoke(main, ["report", "--run", str(run), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    rebuilt = json.loads((tmp_path / "again" / "report.json").read_text())
    assert rebuilt["protocols"] == report["protocols"]
    missing = CliRunner().invoke(main, ["report", "--run", str(tmp_path)])
    assert missing.exit_code != 0 and "has no run_state.json" in missing.output


@pytest.mark.e2e  # a whole `lum run` of examples/tiny-log
def test_a_run_config_can_use_a_log_imported_before(tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLE.parents[1])
    config = yaml.safe_load((EXAMPLE / "run.yaml").read_text())
    run = tmp_path / "imported"
    config.update(run_dir=str(run), data={"source": "imported"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    nothing = CliRunner().invoke(main, ["run", "--config", str(path)])
    assert nothing.exit_code != 0 and "has no finished data step" in nothing.output and str(run) in nothing.output
    data = yaml.safe_load((EXAMPLE / "run.yaml").read_text())["data"]
    # the config's paths are relative to its own folder (docs/run.md); the command line's to the working directory
    args = ["data", "import", "files", str(EXAMPLE / data["path"]), "--items", str(EXAMPLE / data["items"]), "--ts-unit", "s", "--run", str(run)]
    for option, values in (("--map", data["map"]), ("--condition", data["conditions"]), ("--extra", data["extras"])):
        for value in values:
            args += [option, value]
    imported = CliRunner().invoke(main, args)
    assert imported.exit_code == 0, imported.output
    config["rankers"] = {"models": ["lightgbm"], "variants": ["base", "lum"]}
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["--no-progress", "run", "--config", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "is up to date: skipped" in result.output  # the data step found the imported log and kept it
    assert (run / "report" / "report.md").exists()


def test_lum_ranker_export_writes_the_model_file_and_its_input_spec(tiny_run, tmp_path):
    run, _, _ = tiny_run
    for model, file in (("dlrm", "dlrm.pt2"), ("lightgbm", "lightgbm.txt")):
        out = tmp_path / model
        result = CliRunner().invoke(main, ["ranker", "export", "--ranker", str(run / "rankers" / f"global-{model}-lum"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        spec = json.loads((out / "model_spec.json").read_text())
        assert spec["file"] == file and (out / file).stat().st_size > 1000 and spec["variant"] == "lum"


def test_the_scored_test_window_counts_each_items_earlier_interactions_for_the_cold_slices(tiny_run):
    """No counter before the row's day is no impression before it: the item-interactions slice has no unknowns."""
    run, _, _ = tiny_run
    scored = pq.read_table(run / "scores" / "global.parquet", columns=["item_popularity", "item_interactions"]).to_pandas()
    assert (scored["item_interactions"] == scored["item_popularity"].fillna(0)).all()
    report = json.loads((run / "report" / "report.json").read_text())
    cold = [s for s in report["protocols"][0]["slices"] if s["family"] == "item interactions"]
    assert {s["value"] for s in cold} <= {"0", "1-5", "6+"} and sum(s["rows"] for s in cold) == len(scored)
    assert all({x["metric"] for x in s["lifts"]} == {"gauc", "auc"} for s in cold)
