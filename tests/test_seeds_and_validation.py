"""`lum run --seeds N` (the lifts across training seeds) and `lum run --holdout validation` (settings chosen on a
validation window carved from training, the test window never read)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from scipy import stats

from pipelines.cli import main
from pipelines.data.sources.base import SourceOutput, read_dataset_info, write_source_output
from pipelines.data.split import SplitConfig, assign_windows
from pipelines.paths import RunPaths
from pipelines.report.seeds import t_interval
from tests.conftest import TINY_RUN

# the cheapest run that still has an LM, LUM features and a lift: one ranker model, two variants
CHEAP = {**TINY_RUN, "rankers": {**TINY_RUN["rankers"], "models": ["lightgbm"]}, "targets": {"gauc_lift_min": 0.0, "auc_lift_min": 0.0}}


def _config(tmp_path, name: str, **changes) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / name), **CHEAP, **changes}))
    return str(path)


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, ["--no-progress", "run", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_t_interval_is_students():
    values = [0.010, 0.014, 0.007]
    mean, low, high = t_interval(values)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert mean == pytest.approx(np.mean(values)) and (low, high) == pytest.approx((mean - half, mean + half))
    assert np.isnan(t_interval([0.01])[1]) and t_interval([0.01, None, float("nan"), 0.03])[0] == pytest.approx(0.02)


@pytest.mark.e2e  # whole `lum run`s
def test_seeds_retrain_on_the_same_data_and_the_report_shows_every_seeds_lift(tmp_path):
    output = _run("--config", _config(tmp_path, "run"), "--seeds", "2")
    run, seed = tmp_path / "run", tmp_path / "run" / "seeds" / "seed-1"
    assert "=== seed 2 of 2" in output
    # the same events and split, another model (pretraining seed + 1) and other rankers
    assert pq.read_table(seed / "data" / "events.parquet").equals(pq.read_table(run / "data" / "events.parquet"))
    assert (seed / "splits" / "global" / "test.parquet").read_bytes() == (run / "splits" / "global" / "test.parquet").read_bytes()
    manifests = [json.loads(next((r / "models").glob("*/lum_manifest.json")).read_text()) for r in (run, seed)]
    assert manifests[0]["pretrain_config"]["seed"] == 0 and manifests[1]["pretrain_config"]["seed"] == 1
    assert manifests[0]["model_version"] != manifests[1]["model_version"]
    assert "online store" not in json.loads((seed / "run_state.json").read_text())["steps"]  # a sub-run serves nothing

    report = json.loads((run / "report" / "report.json").read_text())
    theirs = json.loads((seed / "report" / "report.json").read_text())
    (section,) = report["seeds"]
    assert section["seeds"] == [0, 1]
    gauc = next(x for x in section["lifts"] if x["metric"] == "gauc" and x["comparison"] == "+LUM vs base")
    mine = next(x for x in report["protocols"][0]["lifts"] if x["metric"] == "gauc" and x["comparison"] == "+LUM vs base")
    other = next(x for x in theirs["protocols"][0]["lifts"] if x["metric"] == "gauc" and x["comparison"] == "+LUM vs base")
    assert gauc["values"] == [mine["delta"], other["delta"]] and mine["delta"] != other["delta"]
    assert gauc["bootstrap"][1] == {"low": other["low"], "high": other["high"]}
    assert (gauc["mean"], gauc["low"], gauc["high"]) == pytest.approx(t_interval(gauc["values"]))
    assert gauc["positive_on_every_seed"] == (min(gauc["values"]) > 0)
    target = next(t for t in section["targets"] if t["target"] == "gauc_lift_min")

    def met_in(seed_report: dict) -> bool:
        """That seed's own verdict on the same target (a report lists auc_lift_min and gauc_lift_min in its own order)."""
        return next(t["met"] for t in seed_report["protocols"][0]["targets"] if (t["target"], t["model"]) == (target["target"], target["model"]))

    assert target["met"] == [met_in(report), met_in(theirs)]
    assert target["held_on_every_seed"] == all(target["met"])
    markdown = (run / "report" / "report.md").read_text()
    assert "## Across seeds" in markdown and "seed +1" in markdown and "held on every seed" in markdown
    # `lum report` rebuilds the same section from the folders
    again = CliRunner().invoke(main, ["report", "--run", str(run), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "report.json").read_text())["seeds"] == report["seeds"]


@pytest.mark.e2e  # whole `lum run`s
def test_the_validation_run_never_reads_the_test_window(tmp_path):
    """The validation run's folder holds the log without its test window; a log whose test-window labels are all
    flipped gives the very same validation report (so no setting chosen on it can depend on the test window)."""
    output = _run("--config", _config(tmp_path, "run"), "--holdout", "validation")
    run = tmp_path / "run"
    assert "=== validation run" in output and not (run / "models").exists()  # the plain run trains nothing
    events = pq.read_table(run / "data" / "events.parquet")
    window = assign_windows(events, SplitConfig(protocol="global", fractions=(0.6, 0.2, 0.2)))
    kept = pq.read_table(run / "validation" / "data" / "events.parquet")
    assert kept.num_rows == int((window < 2).sum()) and kept.equals(events.filter(window < 2))
    test_start = pc.min(events.filter(window == 2).column("ts")).as_py()
    assert pc.max(kept.column("ts")).as_py() < test_start
    # the validation window is the latest half of the ranker-training window, by time
    split = json.loads((run / "validation" / "splits" / "global" / "summary.json").read_text())["windows"]
    train_events = int((window == 1).sum())
    # (quantile boundaries of the shorter log: the windows move by a few tied events at most)
    assert abs(split["test"]["events"] + split["train"]["events"] - train_events) <= 0.01 * train_events
    assert abs(split["test"]["events"] - train_events / 2) <= 0.02 * train_events
    report = json.loads((run / "validation" / "report" / "report.json").read_text())
    assert "validation window" in report["title"]

    # the same log with every test-window label flipped, as data imported into another run folder
    flipped = events.set_column(events.schema.get_field_index("label"), "label",
                                pc.if_else(window == 2, pc.subtract(1, events.column("label")), events.column("label")).cast(events.schema.field("label").type))
    poisoned = RunPaths(tmp_path / "poisoned")
    write_source_output(SourceOutput(flipped, pq.read_table(RunPaths(run).items), source=read_dataset_info(RunPaths(run))["source"]), poisoned)
    _run("--config", _config(tmp_path, "poisoned", data={"source": "imported"}), "--holdout", "validation")
    again = json.loads((tmp_path / "poisoned" / "validation" / "report" / "report.json").read_text())
    assert pq.read_table(tmp_path / "poisoned" / "validation" / "data" / "events.parquet").equals(kept)
    assert again["protocols"][0]["variants"] == report["protocols"][0]["variants"]
    assert again["protocols"][0]["lifts"] == report["protocols"][0]["lifts"]
