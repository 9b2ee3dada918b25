"""Bad input through the command line: each case exits non-zero with a message that names the file, key or value
(issue 21). One table; the cases run in a few seconds together."""

from __future__ import annotations

import json
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


def _float_ids(tmp: Path) -> str:
    path = tmp / "float_ids.parquet"
    pq.write_table(pa.table({"user_id": [1.0, 2.0], "item_id": ["a", "b"], "ts": pa.array([0, 1], pa.timestamp("us", tz="UTC")), "label": [1, 0]}), path)
    return str(path)


# (case, files to write -> args, what the message must contain)
CASES = [
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


def test_an_unreachable_redis_is_one_clear_line(tmp_path):
    run = str(tmp_path / "r")
    assert CliRunner().invoke(main, ["data", "make", "--preset", "tiny", "--run", run]).exit_code == 0
    applied = CliRunner().invoke(main, ["features", "apply", "--run", run, "--online-store", "redis", "--redis-url", "127.0.0.1:1"])
    assert applied.exit_code == 0, applied.output
    result = CliRunner().invoke(main, ["features", "materialize", "--run", run])
    assert result.exit_code != 0 and "cannot connect" in result.output and "127.0.0.1:1" in result.output
    assert len(result.output.splitlines()) <= 3
