"""Bad input through the command line: each case exits non-zero with a message that names the file, key or value
(issue 21). One table; the cases run in a few seconds together."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import main

LOG = "user_id,item_id,ts,label\n"


def _write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _binary_condition(tmp: Path) -> str:
    path = tmp / "binary.parquet"
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["a"], "ts": pa.array([1_700_000_000_000_000], pa.timestamp("us", tz="UTC")),
                             "label": [1], "surface": pa.array([b"\xff"], pa.binary())}), path)
    return str(path)


def _float_ids(tmp: Path) -> str:
    path = tmp / "float_ids.parquet"
    pq.write_table(pa.table({"user_id": [1.0, 2.0], "item_id": ["a", "b"], "ts": pa.array([0, 1], pa.timestamp("us", tz="UTC")), "label": [1, 0]}), path)
    return str(path)


def _imported(tmp: Path, rows: str) -> str:
    """A run folder holding an imported log of `rows` (CSV lines after the header)."""
    run = str(tmp / "run")
    result = CliRunner().invoke(main, ["data", "import", "files", _write(tmp, "log.csv", LOG + rows), "--run", run])
    assert result.exit_code == 0, result.output
    return run


THREE_DAYS = "u,a,2024-01-01T00:00:00Z,1\nu,b,2024-01-02T00:00:00Z,0\nv,a,2024-01-03T00:00:00Z,1\n"


def _bytes(tmp: Path, name: str, data: bytes) -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


# (case, files to write -> args, what the message must contain)
CASES = [
    # issue 35: errors that did not name the file, the flag or the encoding
    ("--min-ts notatime", lambda t: ["data", "import", "files", _write(t, "ok.csv", LOG + THREE_DAYS), "--min-ts", "notatime", "--run", str(t / "r")],
     ["--min-ts", "cannot read 'notatime' as a time", "ISO 8601"]),
    ("--at notatime", lambda t: ["data", "split", "--at", "notatime", "2024-01-02", "--run", str(t / "r")], ["--at", "cannot read 'notatime' as a time"]),
    ("--at out of order", lambda t: ["data", "split", "--at", "2024-01-03", "2024-01-02", "--run", str(t / "r")], ["--at", "must be ordered"]),
    ("a UTF-16 CSV", lambda t: ["data", "validate", _bytes(t, "u16.csv", (LOG + THREE_DAYS).encode("utf-16"))],
     ["u16.csv", "encoded as UTF-16", "expected UTF-8"]),
    ("a Latin-1 condition value in a CSV", lambda t: ["data", "validate", "--condition", "surface",
                                                      _bytes(t, "latin.csv", b"user_id,item_id,ts,label,surface\nu,a,2024-01-01,1,caf\xe9\n")],
     ["latin.csv", "column 'surface'", "not valid UTF-8", "row 1: b'caf\\xe9'", "Latin-1"]),
    ("a non-UTF-8 condition in Parquet (type binary)", lambda t: ["data", "validate", "--condition", "surface", _binary_condition(t)],
     ["binary.parquet", "column 'surface'", "not valid UTF-8", "row 1: b'\\xff'"]),
    ("a Latin-1 id in a CSV", lambda t: ["data", "validate", _bytes(t, "latin_id.csv", b"user_id,item_id,ts,label\nJos\xe9,a,2024-01-01,1\n")],
     ["latin_id.csv", "not UTF-8 text", "Latin-1"]),
    ("features get without a feature repo", lambda t: ["features", "get", "--user", "u", "--run", str(t / "nothing")],
     ["--run", "nothing/feature_repo holds no feature repo", "lum features apply"]),
    ("split --fractions 0.9 0.9 0.9", lambda t: ["data", "split", "--fractions", "0.9", "0.9", "0.9", "--run", str(t / "r")],
     ["--fractions", "summing to 1", "got 0.9 0.9 0.9 (sum 2.7)"]),
    # issue 35: accepted silently before
    ("--at leaving the test window empty", lambda t: ["data", "split", "--at", "2024-01-01T12:00:00Z", "2030-01-01", "--run", _imported(t, THREE_DAYS)],
     ["--at 2024-01-01T12:00:00Z 2030-01-01", "leaves the test window(s) empty", "run from 2024-01-01T00:00:00+00:00 to 2024-01-03"]),
    ("--last-k leaving the training window empty",
     lambda t: ["data", "split", "--protocol", "per-user", "--last-k", "1", "1", "--run", _imported(t, "u,a,2024-01-01,1\nv,a,2024-01-02,0\n")],
     ["--last-k 1 1", "leaves the pretrain and train window(s) empty"]),
    ("a 1 MB id", lambda t: ["data", "validate", _write(t, "big.csv", LOG + "x" * 1_000_000 + ",a,2024-01-01T00:00:00Z,1\n")],
     ["big.csv", "column 'user_id'", "longer than 1,024 bytes", "(1,000,000 bytes)"]),
    ("a quoted newline inside an id", lambda t: ["data", "validate", _write(t, "nl.csv", LOG + '"a\nb",a,2024-01-01T00:00:00Z,1\n')],
     ["nl.csv", "column 'user_id'", "control character", "row 1: 'a\\nb'"]),
    ("none (lower case) as an id", lambda t: ["data", "validate", _write(t, "lnone.csv", LOG + "u,none,2024-01-01T00:00:00Z,1\n")],
     ["lnone.csv", "column 'item_id'", "missing value written as text", "row 1: 'none'"]),
    ("undefined as an id", lambda t: ["data", "validate", _write(t, "undef.csv", LOG + "undefined,a,2024-01-01T00:00:00Z,1\n")],
     ["undef.csv", "column 'user_id'", "missing value written as text", "row 1: 'undefined'"]),
    ("pretrain --lr 1e6", lambda t: ["pretrain", "--lr", "1e6", "--run", str(t / "r")], ["--lr", "less than or equal to 1", "1000000.0"]),
    ("sasrec lr 1e6 in a run config", lambda t: ["run", "--config", _write(t, "lr.yaml", "lm: {evaluate: {sasrec_model: {lr: 1.0e+6}}}\n")],
     ["lr.yaml", "lm.evaluate.sasrec_model.lr", "less than or equal to 1"]),
    ("ranker learning rates 1e6 in a run config", lambda t: ["run", "--config", _write(t, "rlr.yaml", "rankers: {lightgbm: {learning_rate: 1.0e+6}}\n")],
     ["rlr.yaml", "rankers.lightgbm.learning_rate", "less than or equal to 1"]),
    ("DLRM dense_lr 1e6 by --set", lambda t: ["run", "--set", "rankers.dlrm.dense_lr=1e6", "--run", str(t / "r")],
     ["rankers.dlrm.dense_lr", "less than or equal to 1"]),

    ("duplicate header column", lambda t: ["data", "validate", _write(t, "dup.csv", "user_id,item_id,ts,label,label\n1,a,2024-01-01T00:00:00Z,1,0\n")],
     ["dup.csv", "'label' appear more than once"]),
    ("a log with 0 events", lambda t: ["data", "import", "files", _write(t, "empty.csv", LOG), "--run", str(t / "r")],
     ["empty.csv", "no rows"]),
    ("a whitespace-only id", lambda t: ["data", "validate", _write(t, "ws.csv", LOG + '" ",a,2024-01-01T00:00:00Z,1\n')],
     ["ws.csv", "column 'user_id'", "only whitespace", "row 1: ' '"]),
    ("None written as an id", lambda t: ["data", "validate", _write(t, "none.csv", LOG + "None,a,2024-01-01T00:00:00Z,1\n")],
     ["none.csv", "column 'user_id'", "missing value written as text", "row 1: 'None'"]),
    ("float ids", lambda t: ["data", "validate", _float_ids(t)], ["float_ids.parquet", "user_id", "has type double; expected string ids"]),
    ("a YAML syntax error", lambda t: ["run", "--config", _write(t, "bad.yaml", "run_dir: [unclosed\n")], ["cannot read run config", "bad.yaml", "line 1"]),
    ("run_dir: null", lambda t: ["run", "--config", _write(t, "null.yaml", "run_dir: null\n")], ["null.yaml", "run_dir: Input should be a valid string"]),
    ("lm.epochs in the wrong section", lambda t: ["run", "--config", _write(t, "e.yaml", "lm: {epochs: 3}\n")],
     ["lm.epochs: unknown key", "lm.pretrain"]),
    ("epochs: ten", lambda t: ["run", "--config", _write(t, "ten.yaml", "lm: {pretrain: {epochs: ten}}\n")],
     ["lm.pretrain.epochs", "valid integer", "'ten'"]),
    ("epochs: 1.5", lambda t: ["run", "--config", _write(t, "frac.yaml", "lm: {pretrain: {epochs: 1.5}}\n")],
     ["lm.pretrain.epochs", "fractional part", "1.5"]),
    ("embed.job.engine: onnx", lambda t: ["run", "--config", _write(t, "onnx.yaml", "embed: {job: {engine: onnx}}\n")],
     ["embed.job.engine", "'vllm' or 'torch'", "'onnx'"]),
    ("--set without =", lambda t: ["run", "--set", "rankers.dlrm.batch_size"], ["--set", "'rankers.dlrm.batch_size'", "expected KEY=VALUE"]),
    ("--set into a list", lambda t: ["run", "--config", _write(t, "p.yaml", "protocols: [{split: global}]\n"), "--set", "protocols.split=global"],
     ["p.yaml", "cannot set protocols.split", "protocols is not a section"]),
    ("--set a misspelt key", lambda t: ["run", "--set", "rankers.dlrm.batchsize=2", "--run", str(t / "r")],
     ["rankers.dlrm.batchsize: unknown key", "batch_size"]),
    ("--set a wrong type", lambda t: ["run", "--set", "seeds=many", "--run", str(t / "r")], ["seeds", "valid integer"]),
    ("holdout: validation over two splits", lambda t: ["run", "--config", _write(t, "two.yaml", "protocols: [{split: global}, {split: per-user}]\n"),
                                                       "--holdout", "validation"], ["every protocol must have the same split"]),
    ("a misspelt run-config key", lambda t: ["run", "--config", _write(t, "typo.yaml", "rankers: {modles: [dlrm]}\n")],
     ["rankers.modles: unknown key", "did you mean `models`"]),
    ("a misspelt key in lum --config",
     lambda t: ["--config", _write(t, "cfg.yaml", "data:\n  make:\n    presett: tiny\n"), "data", "make", "--run", str(t / "r")],
     ["cfg.yaml", "data.make.presett: no such command or option", "did you mean preset"]),
    ("a command in lum --config that does not exist", lambda t: ["--config", _write(t, "cmd.yaml", "pretrian: {epochs: 2}\n"), "data", "make"],
     ["pretrian: no such command or option", "did you mean pretrain"]),
    ("pretrain --max-steps -3", lambda t: ["pretrain", "--max-steps", "-3", "--run", str(t / "r")], ["--max-steps", "-3"]),
    ("pretrain --checkpoint-every 0", lambda t: ["pretrain", "--checkpoint-every", "0", "--run", str(t / "r")], ["--checkpoint-every", "0"]),
    ("pretrain --max-history 0", lambda t: ["pretrain", "--max-history", "0", "--run", str(t / "r")], ["--max-history", "0"]),
    ("pretrain --preset huge", lambda t: ["pretrain", "--preset", "huge", "--run", str(t / "r")], ["huge"]),
    ("retrieve --top 0", lambda t: ["retrieve", "--model", str(t), "--events", _float_ids(t), "--as-of", "2024-01-02", "--top", "0",
                                    "--out", str(t / "c")], ["--top", "0"]),
    ("retrieve from a folder that is no model", lambda t: ["retrieve", "--model", str(t), "--events", _float_ids(t), "--as-of", "2024-01-02",
                                                         "--out", str(t / "c")], ["is not a LUM model folder", "lum pretrain"]),
    ("retrieve --as-of yesterday", lambda t: ["retrieve", "--model", str(t), "--events", _float_ids(t), "--as-of", "yesterday",
                                              "--out", str(t / "c")], ["cannot read as-of time(s) 'yesterday'"]),
]


@pytest.mark.parametrize("case, make_args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(case, make_args, expected, tmp_path):
    result = CliRunner().invoke(main, make_args(tmp_path))
    assert result.exit_code != 0, f"{case}: accepted\n{result.output}"
    assert "Traceback" not in result.output and not (result.exception and not isinstance(result.exception, SystemExit)), result.output
    assert "ArgsKwargs" not in result.output and "errors.pydantic.dev" not in result.output, f"{case}: a raw pydantic dump\n{result.output}"
    for text in expected:
        assert text in result.output, f"{case}: {text!r} not in\n{result.output}"


def test_ids_are_normalised_to_nfc_and_1_is_not_1_0(tmp_path):
    """Decided: ids are exact strings after Unicode NFC normalisation (a composed and a decomposed é are one user);
    "1" and "1.0" are two ids (CSV ids are read as text, never as numbers)."""
    composed, decomposed = unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")
    assert composed != decomposed
    log = _write(tmp_path, "ids.csv", LOG + f"{composed},a,2024-01-01T00:00:00Z,1\n{decomposed},b,2024-01-01T00:01:00Z,0\n"
                                           "1,a,2024-01-01T00:02:00Z,1\n1.0,b,2024-01-01T00:03:00Z,0\n")
    result = CliRunner().invoke(main, ["data", "import", "files", log, "--run", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    users = pq.read_table(tmp_path / "r" / "data" / "events.parquet").column("user_id").to_pylist()
    assert sorted(set(users)) == sorted({composed, "1", "1.0"})
    info = json.loads((tmp_path / "r" / "data" / "dataset.json").read_text())
    assert any("NFC" in c for c in info.get("coercions", [])), info.get("coercions")


@pytest.mark.e2e  # Feast's Redis client waits out its connection retries
def test_an_unreachable_redis_is_one_clear_line(tmp_path):
    run = str(tmp_path / "r")
    assert CliRunner().invoke(main, ["data", "make", "--preset", "tiny", "--run", run]).exit_code == 0
    applied = CliRunner().invoke(main, ["features", "apply", "--run", run, "--online-store", "redis", "--redis-url", "127.0.0.1:1"])
    assert applied.exit_code == 0, applied.output
    result = CliRunner().invoke(main, ["features", "materialize", "--run", run])
    assert result.exit_code != 0 and "cannot connect" in result.output and "127.0.0.1:1" in result.output
    assert len(result.output.splitlines()) <= 3


def _model_copy(tmp: Path, model: Path, edit: str = "") -> str:
    """A copy of the tiny LM's folder with one file damaged: `manifest` (not JSON) or `vocab` (config.json's vocab_size text)."""
    folder = tmp / f"model-{edit or 'ok'}"
    shutil.copytree(model, folder)
    if edit == "manifest":
        (folder / "lum_manifest.json").write_text("{not json")
    elif edit == "vocab":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": "many"}))
    return str(folder)


# (case, (tmp, model folder, events Parquet) -> args, what the message must contain): `lum embed` / `lum retrieve` inputs,
# checked before any engine starts (issue 35)
MODEL_CASES = [
    ("--events given a CSV", lambda t, m, e: ["embed", "--model", _model_copy(t, m), "--events", _write(t, "ev.csv", LOG), "--as-of", "2025-01-20",
                                             "--out", str(t / "o")], ["ev.csv (given as --events): not a Parquet file", "lum data import files"]),
    ("--as-of rows: given a CSV", lambda t, m, e: ["embed", "--model", _model_copy(t, m), "--events", e, "--as-of", "rows:" + _write(t, "rows.csv", LOG),
                                                  "--out", str(t / "o")], ["rows.csv (given as --as-of rows:PATH): not a Parquet file"]),
    ("lum_manifest.json that is not JSON", lambda t, m, e: ["embed", "--model", _model_copy(t, m, "manifest"), "--events", e, "--as-of", "2025-01-20",
                                                           "--out", str(t / "o")], ["model-manifest/lum_manifest.json: not a JSON manifest"]),
    ("config.json with a bad vocab_size", lambda t, m, e: ["embed", "--model", _model_copy(t, m, "vocab"), "--events", e, "--as-of", "2025-01-20",
                                                          "--out", str(t / "o")], ["model-vocab/config.json: not a valid model config", "vocab_size"]),
    ("--as-of decades after the last event", lambda t, m, e: ["retrieve", "--model", _model_copy(t, m), "--events", e, "--as-of", "2090-01-01",
                                                             "--out", str(t / "o")], ["--as-of 2090-01-01", "days after the last event", "check the year"]),
]


@pytest.fixture(scope="module")
def tiny_model(tiny_lm, tiny_sim, tmp_path_factory) -> tuple[Path, str]:
    events = tmp_path_factory.mktemp("hostile") / "events.parquet"
    pq.write_table(tiny_sim[0], events)
    return tiny_lm[0], str(events)


@pytest.mark.parametrize("case, make_args, expected", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_job_input_is_a_clear_error(case, make_args, expected, tiny_model, tmp_path):
    result = CliRunner().invoke(main, make_args(tmp_path, *tiny_model))
    assert result.exit_code != 0, f"{case}: accepted\n{result.output}"
    assert "Traceback" not in result.output and not (result.exception and not isinstance(result.exception, SystemExit)), result.output
    for text in expected:
        assert text in result.output, f"{case}: {text!r} not in\n{result.output}"
    assert "model.safetensors" not in result.output, result.output  # the weights are fine: never blamed


def test_bad_split_fractions_in_a_run_config_fail_before_the_data_step(tmp_path):
    """Checked when the config loads: before the fix the data step ran (minutes on the default preset), then a pydantic dump."""
    config = _write(tmp_path, "fr.yaml", "protocols: [{split: global, fractions: [0.9, 0.9, 0.9]}]\n")
    result = CliRunner().invoke(main, ["run", "--config", config, "--run", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "fr.yaml" in result.output and "protocols.0.fractions: split fractions must be three non-negative numbers summing to 1" in result.output
    assert "ArgsKwargs" not in result.output and not (tmp_path / "r" / "data").exists(), result.output


def test_normalize_id_is_the_imports_normalisation(tmp_path):
    """contracts.names.normalize_id (what a lookup calls) gives exactly the ids the import stored."""
    from contracts.names import normalize_id

    ids = [unicodedata.normalize("NFD", "José"), "Å", "\u212b", "ﬁ", "plain", unicodedata.normalize("NFD", "Ñandú")]
    log = _write(tmp_path, "ids.csv", LOG + "".join(f"{u},a,2024-01-01T00:0{n}:00Z,1\n" for n, u in enumerate(ids)))
    assert CliRunner().invoke(main, ["data", "import", "files", log, "--run", str(tmp_path / "r")]).exit_code == 0
    stored = set(pq.read_table(tmp_path / "r" / "data" / "events.parquet").column("user_id").to_pylist())
    assert stored == {normalize_id(u) for u in ids}
    assert normalize_id("\u212b") == normalize_id("Å") == "Å" and normalize_id("ﬁ") == "ﬁ"  # NFC, not NFKC: compatibility forms stay


# ---------------------------------------------------------------------------------------------------------------
# Data import (issue 35 A)

def test_items_map_renames_the_items_tables_columns(tmp_path):
    """--map renames the events' columns only; the items table has its own header and its own --items-map."""
    log = _write(tmp_path, "ratings.csv", "userId,movieId,ts,label\nu,m1,2024-01-01,1\nu,m2,2024-01-02,0\n")
    items = _write(tmp_path, "movies.csv", "movieId,title\nm1,Alien\nm2,Heat\n")
    args = ["data", "import", "files", log, "--map", "user_id=userId", "--map", "item_id=movieId", "--items", items]
    unmapped = CliRunner().invoke(main, [*args, "--run", str(tmp_path / "a")])
    assert unmapped.exit_code != 0 and "movies.csv: missing column 'item_id'" in unmapped.output and "--items-map item_id=" in unmapped.output
    mapped = CliRunner().invoke(main, [*args, "--items-map", "item_id=movieId", "--run", str(tmp_path / "b")])
    assert mapped.exit_code == 0, mapped.output
    table = pq.read_table(tmp_path / "b" / "data" / "items.parquet")
    assert table.column_names == ["item_id", "title"] and table.column("item_id").to_pylist() == ["m1", "m2"]
    info = json.loads((tmp_path / "b" / "data" / "dataset.json").read_text())
    assert info["source"]["items_column_map"] == {"movieId": "item_id"}
    bad = CliRunner().invoke(main, [*args, "--items-map", "item_id", "--run", str(tmp_path / "c")])
    assert bad.exit_code != 0 and "items_map: 'item_id' is not contract_name=source_name" in bad.output


def test_a_quarantined_share_over_1_percent_is_a_warning_with_the_share(tmp_path):
    rows = "".join(f"u{n},a,2024-01-01T00:00:{n:02d}Z,1\n" for n in range(60)) + "".join(f"v{n},a,2024-01-02T00:00:{n:02d}Z,0\n" for n in range(40))
    few = CliRunner().invoke(main, ["data", "import", "files", _write(tmp_path, "few.csv", LOG + rows + "w,a,notatime,1\n"),
                                    "--on-bad", "quarantine", "--run", str(tmp_path / "few")])
    assert few.exit_code == 0 and "set aside 1 rejected rows" in few.output and "% of rows" not in few.output, few.output
    many = CliRunner().invoke(main, ["data", "import", "files", _write(tmp_path, "many.csv", LOG + THREE_DAYS + "w,a,notatime,1\n"),
                                     "--on-bad", "quarantine", "--run", str(tmp_path / "many")])
    assert many.exit_code == 0, many.output
    assert f"warning: 25.0% of rows (1 of 4) quarantined: see {tmp_path / 'many' / 'data' / 'events.quarantine.parquet'}" in many.output


def test_events_of_items_missing_from_the_items_table_and_unknown_conditions_are_kept_and_reported(tmp_path):
    """Decided (docs/data.md): such events are kept (a catalogue export lags the log; dropping them would cut user
    histories), counted in the import's output, dataset.json and `lum data describe`. An empty or whitespace-only
    condition value is the unknown condition (null), as an empty CSV field already was."""
    log = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["u", "u", "v", "v"], "item_id": ["a", "gone", "gone", "b"],
                             "ts": pa.array([1_700_000_000_000_000 + n for n in range(4)], pa.timestamp("us", tz="UTC")),
                             "label": [1, 0, 1, 0], "surface": ["home", "", None, "  "]}), log)
    items = _write(tmp_path, "items.csv", "item_id,title\na,A\nb,B\n")
    run = tmp_path / "r"
    result = CliRunner().invoke(main, ["data", "import", "files", str(log), "--items", items, "--condition", "surface", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert "warning: 2 events (50.0%) have an item with no row in the items table (1 items): kept" in result.output
    assert "warning: 3 events (75.0%) have no value in condition column 'surface': kept as an unknown condition" in result.output
    info = json.loads((run / "data" / "dataset.json").read_text())
    assert info["checks"] == {"unknown_conditions": {"surface": 3}, "events_item_not_in_items": 2, "items_not_in_items": 1}
    assert "surface: 2 empty or whitespace-only value(s) read as unknown (null)" in info["coercions"]
    assert pq.read_table(run / "data" / "events.parquet").column("surface").to_pylist().count(None) == 3
    described = CliRunner().invoke(main, ["data", "describe", str(run)])
    assert described.exit_code == 0 and "2 events (50.0%) have an item with no row in the items table" in described.output
