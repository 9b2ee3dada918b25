"""The shared layer: atomic writes, slugs and names, the embedding folder's manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.embeddings import (
    MANIFEST_FILE,
    USER_EMBEDDING_SCHEMA,
    EmbeddingFolderError,
    EmbeddingManifest,
    ShardRecord,
    check_model_version,
    model_data_end,
    read_embedding_manifest,
    require_columns,
    shard_file_name,
)
from contracts.files import atomic_path, copy_file_atomic, write_bytes_atomic, write_json_atomic, write_parquet_atomic, write_text_atomic
from contracts.names import ATTENTION_VARIANTS, COUNTER_COLUMNS, HISTORY_VARIANTS, LUM_VARIANTS, VARIANTS, lum_user_column, slug


# ---------------------------------------------------------------------- atomic writes
def test_atomic_writes_write_the_same_bytes_as_plain_writes(tmp_path):
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", None]})
    write_parquet_atomic(table, tmp_path / "deep" / "t.parquet")  # the folder is created
    pq.write_table(table, tmp_path / "plain.parquet")
    assert (tmp_path / "deep" / "t.parquet").read_bytes() == (tmp_path / "plain.parquet").read_bytes()

    text = write_json_atomic({"b": [1, 2], "a": "é"}, tmp_path / "x.json")
    assert (tmp_path / "x.json").read_text() == text == json.dumps({"b": [1, 2], "a": "é"}, indent=2)
    write_json_atomic({"t": Path("p")}, tmp_path / "d.json", indent=None, default=str)
    assert (tmp_path / "d.json").read_text() == '{"t": "p"}'

    write_text_atomic("café\n", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_bytes() == "café\n".encode("utf-8")
    write_bytes_atomic(b"\x00\x01", tmp_path / "b.bin")
    copy_file_atomic(tmp_path / "b.bin", tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "manifest.json"
    write_json_atomic({"version": 1}, target)
    with pytest.raises(TypeError):
        write_json_atomic({"version": object()}, target)  # fails before anything is written
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "trunc')  # half a file, then the writer dies
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]

    # a failed first write leaves nothing at all
    with pytest.raises((pa.ArrowInvalid, ValueError)):
        _fail_parquet(tmp_path / "new.parquet")
    assert not (tmp_path / "new.parquet").exists() and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def _fail_parquet(path: Path) -> None:
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, pa.schema([("a", pa.int64())])) as writer:
            writer.write_table(pa.table({"a": ["not an int"]}))  # schema mismatch: ArrowInvalid mid-write


def test_a_killed_writer_leaves_only_a_hidden_temporary_file(tmp_path):
    target = tmp_path / "shard.parquet"
    target.write_bytes(b"old")
    code = (
        "import os, sys\n"
        "from contracts.files import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 9
    assert target.read_bytes() == b"old"
    leftover = [p.name for p in tmp_path.iterdir() if p.name != "shard.parquet"]
    assert len(leftover) == 1 and leftover[0].startswith(".shard.parquet.") and leftover[0].endswith(".tmp")
    write_bytes_atomic(b"new", target)  # the next write removes what the dead writer left
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.parquet"]


def test_atomic_path_suffix_for_writers_that_add_an_extension(tmp_path):
    import numpy as np

    with atomic_path(tmp_path / "pca.npz", suffix=".npz") as tmp:
        assert tmp.name.startswith(".pca.npz.") and tmp.name.endswith(".tmp.npz")
        np.savez(tmp, components=np.eye(2))
    assert np.load(tmp_path / "pca.npz")["components"].tolist() == [[1, 0], [0, 1]]


# ---------------------------------------------------------------------- names
def test_slug_keeps_the_ascii_names_of_saved_artifacts():
    assert slug("surface=home|device=mobile") == "surface_home_device_mobile"
    assert slug("surface=item_detail") == "surface_item_detail"
    assert slug("request") == "request"
    assert slug("daypart=late-night") == "daypart_late_night"
    assert lum_user_column("surface=home") == "lum_user__surface_home"


@pytest.mark.parametrize("condition", ["surface=café", "device=平板", "surface=cafè", "surface=caf\u0065\u0301", "city=Zürich|device=平板"])
def test_slug_of_non_ascii_conditions_is_ascii_stable_and_a_valid_identifier(condition):
    name = slug(condition)
    assert name.isascii() and lum_user_column(condition).isidentifier()
    assert name == slug(condition)
    # the same in another process (no per-process hash seed)
    code = f"from contracts.names import slug; print(slug({condition!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1], env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert other.stdout.strip() == name


def test_slug_tells_non_ascii_conditions_apart():
    values = ["surface=café", "surface=cafè", "surface=caf\u0065\u0301", "surface=caf_", "device=平板", "device=手机",
              "device=電腦", "surface=home"]
    slugs = [slug(v) for v in values]
    assert len(set(slugs)) == len(values)
    assert slug("surface=café").startswith("surface_caf__")  # still readable


def test_variants_and_counters():
    assert VARIANTS == ("base", "lum", "pooled-history", "lum+pooled", "din", "din+lum")
    assert set(LUM_VARIANTS) | set(HISTORY_VARIANTS) <= set(VARIANTS)
    assert set(ATTENTION_VARIANTS) == {"din", "din+lum"} and set(ATTENTION_VARIANTS) <= set(HISTORY_VARIANTS)
    assert COUNTER_COLUMNS == ("user_n_events", "user_n_clicks", "user_ctr", "user_recent_ctr", "user_hours_since_last",
                               "item_n_impressions", "item_n_clicks", "item_ctr")


def test_no_look_alike_names_for_different_things():
    """One write_json_atomic (contracts.files; run-folder JSON passes default=float for numpy scalars), and the
    training row's user counters are not named as feature_store/online.py's USER_COUNTERS (the stats view's)."""
    import ast

    import contracts.names as names

    root = Path(__file__).resolve().parents[1]
    defined = [str(path.relative_to(root)) for folder in ("contracts", "lum", "feature_store", "ranker", "pipelines", "benchmarks")
               for path in sorted((root / folder).rglob("*.py"))
               if any(isinstance(node, ast.FunctionDef) and node.name == "write_json_atomic" for node in ast.walk(ast.parse(path.read_text())))]
    assert defined == ["contracts/files.py"]
    assert not hasattr(names, "USER_COUNTERS") and names.USER_ROW_COUNTERS == (*names.USER_STATS_COLUMNS[:-1], "user_hours_since_last")
    assert names.COUNTER_COLUMNS == (*names.USER_ROW_COUNTERS, *names.ITEM_COUNTERS)


# ---------------------------------------------------------------------- the embedding folder
def _manifest() -> EmbeddingManifest:
    settings = {"model_version": "lum-tiny-id-0123456789", "events": "abc", "as_of": "2025-01-12T00:00:00+00:00", "rows": None,
                "conditions": ["surface=home", "device=平板"], "shards": 2, "dim": None}
    manifest = EmbeddingManifest(settings=settings, engine="torch", hidden_size=64, source_model="/models/m")
    manifest.shards[1] = ShardRecord(shard_file_name(1, 2), {"users": 3, "rows": 6, "queries_without_history": 0, "tokens": 90})
    manifest.shards[0] = ShardRecord(shard_file_name(0, 2), {"users": 2, "rows": 4, "queries_without_history": 1, "tokens": 50})
    return manifest


def _write(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    return folder


def test_manifest_round_trip_keeps_the_writers_layout(tmp_path):
    manifest = _manifest()
    data = manifest.to_json()
    assert list(data) == ["settings", "engine", "shards", "complete", "hidden_size", "source_model"]
    assert list(data["shards"]) == ["1", "0"]  # finishing order, as the job wrote it
    manifest.complete, manifest.embedding_dim, manifest.totals, manifest.seconds_this_run = True, 64, {"users": 5}, 1.5
    again = read_embedding_manifest(_write(tmp_path / "job", manifest.to_json()))
    assert again == manifest
    assert json.dumps(again.to_json()) == json.dumps(manifest.to_json())
    assert again.model_version == "lum-tiny-id-0123456789" and again.conditions == ["surface=home", "device=平板"]
    assert not again.rolling and again.shard_files() == [shard_file_name(0, 2), shard_file_name(1, 2)]
    assert shard_file_name(3, 8) == "shard-00003-of-00008.parquet"


def test_a_minimal_manifest_is_enough(tmp_path):
    """What a reader needs (the layout benchmarks/bench_features.py fakes): settings, shards with files, complete, dim."""
    data = {"settings": {"model_version": "bench-v1", "as_of": "2025-01-01T00:00:00+00:00", "rows": None, "conditions": ["surface=home"]},
            "complete": True, "embedding_dim": 8, "shards": {"0": {"file": "shard-00000-of-00001.parquet"}}}
    manifest = read_embedding_manifest(_write(tmp_path, data))
    assert manifest.to_json() == data and manifest.shards[0].counts == {}
    with pytest.raises(EmbeddingFolderError, match=r"shard-00000-of-00001.parquet: shard file listed in .*manifest.json not found"):
        manifest.shard_paths(tmp_path)
    (tmp_path / "users").mkdir()
    pq.write_table(USER_EMBEDDING_SCHEMA.empty_table(), tmp_path / "users" / "shard-00000-of-00001.parquet")
    assert manifest.shard_paths(tmp_path) == [tmp_path / "users" / "shard-00000-of-00001.parquet"]


def _broken(change) -> dict:
    data = _manifest().to_json()
    data.update(complete=True, embedding_dim=64)
    change(data)
    return data


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("settings"), r"field 'settings' is missing"),
        (lambda d: d["settings"].pop("model_version"), r"field 'settings.model_version' is missing"),
        (lambda d: d["settings"].update(model_version="../../etc"), r"model version '../../etc' is not a valid name"),
        (lambda d: d["settings"].update(model_version="v/1"), r"model version 'v/1' is not a valid name"),
        (lambda d: d["settings"].update(model_version=".."), r"is not a valid name"),
        (lambda d: d["settings"].update(model_version=7), r"field 'settings.model_version' must be a string, got 7"),
        (lambda d: d["settings"].update(conditions="surface=home"), r"field 'settings.conditions' must be a list"),
        (lambda d: d["settings"].update(conditions=["a=b", "a=b"]), r"distinct non-empty strings"),
        (lambda d: d["settings"].update(as_of=None), r"field 'settings.as_of' must be a string, got None"),
        (lambda d: d["shards"]["0"].update(file="../../../secret.parquet"), r"field 'shards.0.file' is '../../../secret.parquet', expected a name like"),
        (lambda d: d["shards"]["0"].update(file="/abs/shard-00000-of-00002.parquet"), r"field 'shards.0.file'"),
        (lambda d: d["shards"].update({"x": {"file": "shard-00000-of-00002.parquet"}}), r"field 'shards' has key 'x'"),
        (lambda d: d["shards"]["0"].update(rows="4"), r"field 'shards.0.rows' must be an integer, got '4'"),
        (lambda d: d["shards"]["0"].update(rows=True), r"field 'shards.0.rows' must be an integer, got True"),
        (lambda d: d.update(complete="yes"), r"field 'complete' must be true or false"),
        (lambda d: d.pop("embedding_dim"), r"field 'embedding_dim' is missing from a complete job's manifest"),
        (lambda d: d.update(embedding_dim=0), r"field 'embedding_dim' must be at least 1"),
        (lambda d: d.update(embedding_dim=6.5), r"field 'embedding_dim' must be an integer, got 6.5"),
    ],
)
def test_manifest_errors_name_the_file_and_the_field(tmp_path, change, message):
    folder = _write(tmp_path / "job", _broken(change))
    with pytest.raises(EmbeddingFolderError, match=message) as error:
        read_embedding_manifest(folder)
    assert str(folder / MANIFEST_FILE) in str(error.value)


def test_manifest_that_is_not_a_manifest(tmp_path):
    with pytest.raises(EmbeddingFolderError, match=r"is not the output of `lum embed` \(no manifest.json\)"):
        read_embedding_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_bytes(b"\x80\x04\x95 pickle?")
    with pytest.raises(EmbeddingFolderError, match="not valid JSON"):
        read_embedding_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(EmbeddingFolderError, match="expected a JSON object, got list"):
        read_embedding_manifest(tmp_path)
    assert issubclass(EmbeddingFolderError, ValueError)  # the command line shows it as a one-line error


def test_embedding_and_candidate_manifests_share_one_reader(tmp_path):
    """read_job_manifest reads both folders' manifests: each reader's error class, writer and checks."""
    from contracts.candidates import CandidateFolderError, CandidateManifest, read_candidate_manifest
    from contracts.embeddings import read_job_manifest

    with pytest.raises(CandidateFolderError, match=r"is not the output of `lum retrieve` \(no manifest.json\)"):
        read_candidate_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CandidateFolderError, match=f"{MANIFEST_FILE}: not valid JSON"):
        read_candidate_manifest(tmp_path)
    with pytest.raises(EmbeddingFolderError, match=f"{MANIFEST_FILE}: not valid JSON") as error:
        read_embedding_manifest(tmp_path)
    assert not isinstance(error.value, CandidateFolderError)
    manifest = CandidateManifest(settings={"model_version": "lum-tiny-1"}, engine="torch")
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest.to_json()))
    assert read_job_manifest(tmp_path, CandidateManifest.from_json, CandidateFolderError, "lum retrieve") == manifest == read_candidate_manifest(tmp_path)
    with pytest.raises(EmbeddingFolderError, match="field 'settings.conditions' is missing"):
        read_embedding_manifest(tmp_path)  # the embedding manifest's own checks


def test_model_version_check_and_columns_and_model_data_end(tmp_path):
    assert check_model_version("lum-tiny-semantic-1a2b3c4d5e", "x") == "lum-tiny-semantic-1a2b3c4d5e"
    with pytest.raises(EmbeddingFolderError, match="x: model version"):
        check_model_version("a" * 129, "x")
    with pytest.raises(EmbeddingFolderError, match=r"t.parquet: missing column\(s\) embedding"):
        require_columns(["user_id"], ["user_id", "embedding"], "t.parquet")
    assert model_data_end(tmp_path) is None
    (tmp_path / "lum_manifest.json").write_text(json.dumps({"training_window": {"ts_max": "2025-01-31 23:00:00+00:00"}}))
    assert model_data_end(tmp_path) == "2025-01-31 23:00:00+00:00"
    (tmp_path / "lum_manifest.json").write_text(json.dumps({"training_window": {"ts_max": 5}}))
    with pytest.raises(EmbeddingFolderError, match="training_window.ts_max"):
        model_data_end(tmp_path)
