"""`lum ranker export` (ranker/export.py): the folder it writes and what it refuses to overwrite, the DLRM program
loaded by a process without the project, and model_spec.json's transforms rebuilt without the project's code."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.synthetic import SyntheticConfig, split_by_time, synthetic_training_set
from pipelines.cli import main
from ranker.config import DLRMConfig, FeatureConfig, LightGBMConfig, RankerConfig
from ranker.export import MANIFEST_FILE, SPEC_FILE, ExportError, export_ranker
from ranker.train import TrainedRanker, train_ranker

SMALL_DLRM = DLRMConfig(embedding_dim=8, dense_arch_layers=(16,), over_arch_layers=(16, 8), batch_size=256, epochs=1, threads=1)
SMALL_LGBM = LightGBMConfig(num_leaves=15, n_estimators=30, early_stopping_rounds=10, threads=1)


@pytest.fixture(scope="module")
def data():
    """(training window, later window) of 4,000 synthetic impressions: the columns of a Feast training set."""
    return split_by_time(synthetic_training_set(SyntheticConfig(rows=4_000, users=300, items=500, lum_dim=8)), 0.25)


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory) -> dict[str, Path]:
    """Saved ranker folders ("model-variant"): small ones, with request features as the demo trains them."""
    train, _ = data
    features = FeatureConfig(request_features=True)
    folders = {}
    vectors = replace(features, lum_inputs="vectors")  # the LUM vectors' components as inputs too
    for model, variant, feature_config in (("lightgbm", "lum", features), ("dlrm", "lum+pooled", vectors), ("dlrm", "din+lum", features),
                                           ("lightgbm", "din+lum", features), ("lightgbm", "lum+pooled", vectors)):
        ranker = train_ranker(train, RankerConfig(model=model, variant=variant, dlrm=SMALL_DLRM, lightgbm=SMALL_LGBM, features=feature_config))
        folders[f"{model}-{variant}"] = ranker.save(tmp_path_factory.mktemp("rankers") / f"global-{model}-{variant}")
    return folders


def _export(ranker_folder: Path, out: Path):
    return CliRunner().invoke(main, ["ranker", "export", "--ranker", str(ranker_folder), "--out", str(out)])


# ------------------------------------------------------------------------------------------------ 1. the --out folder


def test_export_refuses_a_folder_that_is_not_an_earlier_export(saved, tmp_path):
    """issue 35.1: `--out` removed the folder first; a notes file (or a whole run) was lost."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = _export(saved["lightgbm-lum"], out)
    assert result.exit_code != 0
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and str(out) in message and "not an earlier ranker export" in message, message
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left beside it


def test_export_replaces_an_earlier_export_but_not_files_added_to_it(saved, tmp_path):
    out = tmp_path / "exported"
    for _ in range(2):  # new folder, then an earlier export replaced whole
        result = _export(saved["lightgbm-lum"], out)
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], MANIFEST_FILE])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # nothing staged or set aside left over
    (out / "notes.txt").write_text("mine")
    result = _export(saved["lightgbm-lum"], out)
    assert result.exit_code != 0 and "notes.txt" in result.output and str(out) in result.output
    assert (out / "notes.txt").read_text() == "mine" and (out / SPEC_FILE).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(saved["lightgbm-lum"], empty).exit_code == 0 and (empty / SPEC_FILE).exists()


def _read_only_bites(folder: Path) -> bool:
    """Whether a chmod 555 folder refuses this process's writes (root with CAP_DAC_OVERRIDE writes anyway; root
    without it, e.g. under `setpriv --inh-caps=-dac_override ...`, is refused like anyone)."""
    probe = folder / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").touch()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)


def test_export_into_a_read_only_folder_is_one_line_and_leaves_the_earlier_export(saved, tmp_path):
    """issue 35.1: an OSError (here permission denied; a full disk is the same path) is one line naming the path and
    the OS's reason, and leaves neither a traceback nor a half-written folder."""
    if os.geteuid() == 0 and not _read_only_bites(tmp_path):
        pytest.skip("root writes into read-only folders: chmod does not bite")
    parent = tmp_path / "shared"
    parent.mkdir()
    out = parent / "exported"
    assert _export(saved["lightgbm-lum"], out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    parent.chmod(0o555)
    try:
        result = _export(saved["lightgbm-lum"], out)
        assert result.exit_code == 1 and "Traceback" not in result.output
        message = result.output.strip()
        assert len(message.splitlines()) == 1 and str(out) in message and "Permission denied" in message, message
        assert sorted(p.name for p in parent.iterdir()) == ["exported"]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    finally:
        parent.chmod(0o755)


def test_an_os_error_while_exporting_is_one_line_naming_the_path(saved, tmp_path):
    """The same OSError path as a read-only folder, but one that bites as root too: the folder's parent is a file."""
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "exported"
    result = _export(saved["lightgbm-lum"], out)
    assert result.exit_code == 1 and "Traceback" not in result.output and result.exception.__class__ is SystemExit
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and message.startswith(f"Error: cannot write the export {out}: "), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_failed_export_removes_its_temporary_folder(saved, data, tmp_path):
    """A DLRM that cannot be traced on the given rows fails after the staging folder exists: it is removed, and the
    earlier export stays."""
    ranker = TrainedRanker.load(saved["dlrm-lum+pooled"])
    out = tmp_path / "exported"
    export_ranker(TrainedRanker.load(saved["lightgbm-lum"]), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _, test = data
    bad = ranker.featurize(test.slice(0, 5))
    bad = replace(bad, dense=bad.dense[:, :3])  # the wrong number of dense inputs: tracing fails
    with pytest.raises(Exception) as failed:
        export_ranker(ranker, out, example=bad)
    assert not isinstance(failed.value, ExportError)  # the model's own error, not an OS one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------------------------ 2. the DLRM program

# Runs in a fresh interpreter: the documented imports (docs/deploy.md, export.json's "load") and nothing else.
BARE_SCORER = """
import json, sys
import torch

folder, cases = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
manifest = json.load(open(folder + "/export.json"))
assert manifest["load"]["python_imports"] == ["torch"], manifest["load"]
model = torch.export.load(folder + "/dlrm.pt2").module()
worst = {}
for case in cases:
    got = model(case["dense"], case["values"], case["lengths"])
    assert got.shape == case["expected"].shape, (got.shape, case["expected"].shape)
    worst[len(got)] = float((got - case["expected"]).abs().max())
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torchrec", "fbgemm_gpu", "ranker", "lum", "pipelines"))
assert not loaded, loaded
print(json.dumps(worst))
"""


@pytest.mark.slow  # a child process loads torch (about 10 s each)
@pytest.mark.parametrize("variant", ["lum+pooled", "din+lum"])
def test_the_exported_dlrm_scores_1_to_1000_candidates_in_a_process_that_imported_only_torch(saved, data, tmp_path, variant):
    """issue 35.2: dlrm.pt2 needed `import fbgemm_gpu` to load (fbgemm operators in the graph) and refused a single
    candidate (exported with Dim("batch", min=2))."""
    import subprocess
    import sys

    import numpy as np
    import torch

    from ranker.export import flat_inputs

    ranker = TrainedRanker.load(saved[f"dlrm-{variant}"])
    out = export_ranker(ranker, tmp_path / "exported")
    _, test = data
    inputs = ranker.featurize(test)
    expected = ranker.score(inputs)  # the in-process model
    cases = []
    for size in (1, 2, 7, 1000):
        rows = np.arange(size) * 3 % len(expected)  # 1,000 rows: some repeated when the window is shorter
        dense, values, lengths = flat_inputs(inputs, rows)
        cases.append({"dense": dense, "values": values, "lengths": lengths, "expected": torch.from_numpy(expected[rows])})
    torch.save(cases, tmp_path / "cases.pt")
    result = subprocess.run([sys.executable, "-c", BARE_SCORER, str(out), str(tmp_path / "cases.pt")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    worst = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(int(k) for k in worst) == [1, 2, 7, 1000] and max(worst.values()) < 1e-5, worst


# ------------------------------------------------------------------------------------------------ 3. the input ops

# Runs the export's own spec_reference.py in a fresh interpreter and checks it needed none of the project's code.
REFERENCE_RUNNER = """
import runpy, sys
reference, spec, rows, out = sys.argv[1:]
sys.argv = [reference, spec, rows, out]
runpy.run_path(reference, run_name="__main__")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ranker", "lum", "pipelines", "feature_store", "contracts", "torch"))
assert not loaded, loaded
"""


def rebuild_without_the_project(ranker: TrainedRanker, table, folder: Path) -> dict:
    """Exports `ranker` and rebuilds the inputs of `table`'s rows from its raw feature columns, model_spec.json and the
    export's spec_reference.py, in a subprocess that never imports `ranker`."""
    import subprocess
    import sys

    import numpy as np
    import pyarrow.parquet as pq

    out = export_ranker(ranker, folder / "exported")
    spec = json.loads((out / SPEC_FILE).read_text())
    inputs = spec.get("features", []) + spec.get("dense", []) + spec.get("sparse", [])
    assert inputs and all(isinstance(i["compute"], dict) and "op" in i["compute"] for i in inputs)
    assert not any("training set holds it" in i.get("transform", "") for i in inputs)
    columns = [*ranker.schema.feature_columns(ranker.variant), ranker.schema.time]
    pq.write_table(table.select(list(dict.fromkeys(columns))), folder / "rows.parquet")  # the raw features only
    result = subprocess.run([sys.executable, "-c", REFERENCE_RUNNER, str(out / "spec_reference.py"), str(out / SPEC_FILE),
                             str(folder / "rows.parquet"), str(folder / "inputs.npz")], capture_output=True, text=True, cwd=folder, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(folder / "inputs.npz"))


def assert_same_inputs(ranker: TrainedRanker, table, rebuilt: dict) -> None:
    import numpy as np

    from ranker.export import flat_inputs

    made = ranker.featurize(table)  # what the service hands the model
    if ranker.config.model == "lightgbm":
        np.testing.assert_allclose(rebuilt["features"], made, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert np.isnan(made).any() and not np.isnan(rebuilt["features"]).all()  # missing values were exercised
    else:
        dense, values, lengths = flat_inputs(made)
        np.testing.assert_allclose(rebuilt["dense"], dense.numpy(), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(rebuilt["lengths"], lengths.numpy())
        np.testing.assert_array_equal(rebuilt["values"], values.numpy())


@pytest.mark.parametrize("key", ["lightgbm-lum", "lightgbm-din+lum", "lightgbm-lum+pooled", "dlrm-lum+pooled", "dlrm-din+lum"])
def test_model_spec_ops_rebuild_the_inputs_without_the_project(saved, data, tmp_path, key):
    """issue 35.3: model_spec.json said "as the training set holds it" for the derived LightGBM inputs. Every input
    now has a `compute` op; the shipped reference interpreter rebuilds the inputs from the raw columns alone."""
    import numpy as np
    import pyarrow as pa

    ranker = TrainedRanker.load(saved[key])
    _, test = data
    # slates: every 6 consecutive rows one request (the user and time of its first), so the request ops compare
    # candidates (the synthetic rows are one candidate per request)
    first = pa.array(np.arange(test.num_rows) // 6 * 6)
    for column in ("user_id", "ts"):
        test = test.set_column(test.column_names.index(column), column, test.column(column).take(first))
    rebuilt = rebuild_without_the_project(ranker, test, tmp_path)
    assert_same_inputs(ranker, test, rebuilt)
    if key.startswith("lightgbm"):  # the ranks within a request were exercised, not all 1
        names = ranker.model.feature_name()
        ranks = rebuilt["features"][:, [i for i, n in enumerate(names) if n.endswith("__request_rank")]]
        assert ranks.shape[1] >= 3 and np.nanmax(ranks) >= 6 and len(np.unique(ranks[~np.isnan(ranks)] % 1)) == 2  # ties: x.5 ranks


def test_model_spec_ops_rebuild_a_real_runs_inputs(tiny_run, tmp_path):
    """The same on a real run: its LightGBM and DLRM and the test window's rows as Feast's point-in-time join gave them."""
    import pyarrow.parquet as pq

    run, _, _ = tiny_run
    test = pq.read_table(sorted((run / "training_sets").glob("global-test-*.parquet"))[0])
    for model in ("lightgbm", "dlrm"):
        ranker = TrainedRanker.load(run / "rankers" / f"global-{model}-lum")
        (tmp_path / model).mkdir()
        assert_same_inputs(ranker, test, rebuild_without_the_project(ranker, test, tmp_path / model))
