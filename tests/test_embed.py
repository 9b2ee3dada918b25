"""The embedding job: engine equivalence, group query, no leakage, resumable shards, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from lum.embed import TorchEngine, VllmEngine, VllmSettings, build_queries, resolve_conditions
from lum.embed_job import PARTITIONS_DIR, AsOf, EmbeddingJob, EmbedJobConfig, EmbedJobError, read_user_embeddings, shard_of
from lum.model import load_model
from lum.tokenizer import BehaviourTokenizer
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
AS_OF = pd.Timestamp("2025-01-20", tz="UTC")


@pytest.fixture(scope="module")
def events_file(tmp_path_factory, tiny_sim) -> Path:
    path = tmp_path_factory.mktemp("embed") / "events.parquet"
    pq.write_table(tiny_sim[0], path)
    return path


@pytest.fixture(scope="module")
def model(tiny_lm):
    folder, manifest = tiny_lm
    return folder, BehaviourTokenizer.load(folder, expected_fingerprint=manifest["tokenizer_fingerprint"])


@pytest.fixture(scope="module")
def torch_engine(model):
    return TorchEngine(str(model[0]))


@pytest.fixture(scope="module")
def vllm_engine(model):
    engine = VllmEngine(str(model[0]), max_model_len=2048, settings=VllmSettings())
    yield engine
    engine.close()


def _groups(model, events: pd.DataFrame, users: int = 40, conditions: int = 4, rolling: bool = False):
    folder, tokenizer = model
    conds = resolve_conditions(tokenizer, "all")[:conditions]
    if rolling:
        picked = events.user_id.drop_duplicates().iloc[:8]
        queries = events[events.user_id.isin(picked)][["user_id", "ts"]].drop_duplicates().assign(key=lambda f: f.ts)
    else:
        queries = pd.DataFrame({"user_id": events.user_id.drop_duplicates().iloc[:users], "ts": AS_OF, "key": AS_OF})
    align = 1 if rolling else tokenizer.config.prompt_align  # as the job does: snapshots fill whole cache blocks
    return build_queries(tokenizer, events, queries, conds, max_history=40, window_stride=8, align=align)


def _min_cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    x, y = np.concatenate(a), np.concatenate(b)
    return float(np.min(np.sum(x * y, axis=1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)))


def test_torch_group_query_equals_one_plain_forward_per_prompt(model, torch_engine, tiny_sim):
    folder, _ = model
    events = tiny_sim[0].to_pandas()
    groups, skipped = _groups(model, events, users=15, rolling=True)
    assert sum(len(g.tokens) for g in groups) < sum(len(p) for g in groups for p in g.prompts()) / 3  # histories shared
    vectors = torch_engine.embed(groups)
    lm = load_model(folder).model
    for group, out in zip(groups[:6], vectors[:6]):
        for prompt, vector in zip(group.prompts(), out):
            with torch.no_grad():
                plain = lm.model(input_ids=torch.as_tensor(prompt)[None]).last_hidden_state[0, -1].numpy()
            np.testing.assert_allclose(vector, plain, atol=1e-4)


def test_snapshot_prompts_fill_whole_cache_blocks_from_their_own_history_only(model, tiny_sim):
    _, tokenizer = model
    events = tiny_sim[0].to_pandas()
    assert tokenizer.config.prompt_align == 32
    plain, _ = build_queries(tokenizer, events, pd.DataFrame({"user_id": events.user_id.drop_duplicates().iloc[:40], "ts": AS_OF, "key": AS_OF}),
                             resolve_conditions(tokenizer, "all")[:2], max_history=40, window_stride=8)
    filled, _ = _groups(model, events, conditions=2)
    assert len(plain) == len(filled) > 20
    fills = []
    for p, f in zip(plain, filled):
        fill = len(f.tokens) - len(p.tokens)
        assert len(f.tokens) % 32 == 0 and 0 <= fill < 32
        assert (f.tokens[: fill + 1] == 1).all() and (f.tokens[fill:] == p.tokens).all()  # [BOS] * fill, then the same history
        assert (f.prefix_lengths == p.prefix_lengths + fill).all()
        fills.append(fill)
    assert len(set(fills)) > 5  # histories of many lengths, so many different fills

    # two snapshot times: the earlier query's prompt is the same whether or not the later one is asked
    users = events.user_id.drop_duplicates().iloc[:10]
    later = AS_OF + pd.Timedelta(days=5)
    conds = resolve_conditions(tokenizer, "all")[:1]
    early_only, _ = build_queries(tokenizer, events, pd.DataFrame({"user_id": users, "ts": AS_OF, "key": AS_OF}), conds, 40, 8, align=32)
    both, _ = build_queries(tokenizer, events,
                            pd.DataFrame({"user_id": list(users) * 2, "ts": [AS_OF] * 10 + [later] * 10, "key": [AS_OF] * 10 + [later] * 10}),
                            conds, 40, 8, align=32)
    early_both = [g for g in both if g.keys[0][0] == AS_OF]
    assert len(early_both) == len(early_only) and len(both) > len(early_only)
    for a, b in zip(early_only, early_both):
        assert (a.tokens == b.tokens).all() and (a.prefix_lengths == b.prefix_lengths).all()


def test_vllm_matches_the_torch_engine_on_every_row(model, torch_engine, vllm_engine, tiny_sim):
    events = tiny_sim[0].to_pandas()
    for rolling in (False, True):
        groups, _ = _groups(model, events, rolling=rolling)
        assert _min_cosine(vllm_engine.embed(groups), torch_engine.embed(groups)) >= 0.999


def test_conditions_together_or_one_at_a_time_give_the_same_vectors(model, torch_engine, vllm_engine, tiny_sim):
    events = tiny_sim[0].to_pandas()
    together, _ = _groups(model, events, users=10, conditions=4)
    for engine in (torch_engine, vllm_engine):
        joint = np.concatenate(engine.embed(together))
        singles = []
        for k in range(4):
            alone, _ = _groups(model, events, users=10, conditions=4)
            for g in alone:  # keep only the k-th condition of every group
                g.prefix_lengths, g.conditions, g.keys = g.prefix_lengths[k::4], g.conditions[k::4], g.keys[k::4]
            singles.append(np.concatenate(engine.embed(alone)))
        interleaved = np.stack(singles, axis=1).reshape(joint.shape)
        np.testing.assert_allclose(joint, interleaved, atol=1e-4)


def test_prefix_caching_on_and_off_give_the_same_vectors(model, vllm_engine, tiny_sim):
    events = tiny_sim[0].to_pandas()
    groups, _ = _groups(model, events, users=20)
    cached = vllm_engine.embed(groups)
    cached_again = vllm_engine.embed(groups)  # now served from the prefix cache
    vllm_engine.close()
    off = VllmEngine(str(model[0]), max_model_len=2048, settings=VllmSettings(enable_prefix_caching=False))
    try:
        uncached = off.embed(groups)
    finally:
        off.close()
    np.testing.assert_allclose(np.concatenate(cached), np.concatenate(uncached), atol=1e-5)
    np.testing.assert_allclose(np.concatenate(cached_again), np.concatenate(uncached), atol=1e-5)


def test_events_after_the_as_of_time_never_change_an_embedding(model, torch_engine, tiny_sim, tmp_path):
    folder, _ = model
    events = tiny_sim[0].to_pandas()
    later = events.ts >= AS_OF
    changed = events.copy()
    changed.loc[later, "item_id"] = "i0"
    changed.loc[later, "surface"] = "cart"
    changed.loc[later, "label"] = 1 - changed.loc[later, "label"]
    paths = {}
    for name, frame in (("original", events), ("changed", changed)):
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), paths[name])
    tables = {}
    for name, path in paths.items():
        job = EmbeddingJob(folder, path, AsOf(times=(AS_OF,)), tmp_path / f"out-{name}", EmbedJobConfig(engine="torch", shards=2))
        job.open_engine(torch_engine)
        job.run(progress=False)
        tables[name] = read_user_embeddings(tmp_path / f"out-{name}")
    assert tables["original"].num_rows > 0
    assert tables["original"].equals(tables["changed"])
    assert (tables["original"].column("event_timestamp").to_pandas() == AS_OF).all()


def test_snapshot_job_output_contract_items_and_counts(model, torch_engine, events_file, tmp_path, tiny_sim):
    folder, tokenizer = model
    job = EmbeddingJob(folder, events_file, AsOf.parse("2025-01-10,2025-01-25"), tmp_path / "out", EmbedJobConfig(engine="torch", shards=3, conditions="all"))
    job.open_engine(torch_engine)
    manifest = job.run(progress=False)
    users = read_user_embeddings(tmp_path / "out")
    frame = users.to_pandas()
    n_conditions = len(tokenizer.full_condition_tokens())
    assert frame.groupby(["user_id", "event_timestamp"]).size().eq(n_conditions).all()
    assert manifest["complete"] and manifest["totals"]["rows"] == len(frame)
    events = tiny_sim[0].to_pandas()
    clicks = events[events.label == 1]
    for t in (pd.Timestamp("2025-01-10", tz="UTC"), pd.Timestamp("2025-01-25", tz="UTC")):
        with_history = clicks[clicks.ts < t].user_id.nunique()
        assert frame[frame.event_timestamp == t].user_id.nunique() == with_history
    assert manifest["totals"]["queries_without_history"] == 2 * events.user_id.nunique() - frame.groupby("event_timestamp").user_id.nunique().sum()
    assert set(frame.model_version) == {json.loads((folder / "lum_manifest.json").read_text())["model_version"]}
    # item vectors are output rows: user . item is the model's own logit for that item
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas().set_index("item_id")
    row = frame.iloc[0]
    item_id = next(i for i in items.index if items.token[i] == f"I:{i}")
    head = load_model(folder).model.lm_head.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(items.embedding[item_id]), head[tokenizer.token_to_id[f"I:{item_id}"]], atol=1e-6)
    assert np.dot(row.embedding, items.embedding[item_id]) == pytest.approx(float(np.dot(row.embedding, head[tokenizer.token_to_id[f"I:{item_id}"]])), rel=1e-5)
    # a re-run finds everything done
    again = EmbeddingJob(folder, events_file, AsOf.parse("2025-01-10,2025-01-25"), tmp_path / "out", EmbedJobConfig(engine="torch", shards=3))
    assert again.run(progress=False)["totals"] == manifest["totals"]
    assert again.engine is None  # nothing was left to compute


def test_rolling_mode_gives_one_embedding_per_row_time(model, torch_engine, events_file, tmp_path):
    folder, _ = model
    events = pq.read_table(events_file).to_pandas()
    rows = events[events.user_id.isin(["u1", "u2", "u3"])][["user_id", "ts"]]
    rows_file = tmp_path / "rows.parquet"
    rows.to_parquet(rows_file)
    job = EmbeddingJob(folder, events_file, AsOf.parse(f"rows:{rows_file}"), tmp_path / "rolling", EmbedJobConfig(engine="torch", shards=2, conditions="all"))
    job.open_engine(torch_engine)
    job.run(progress=False)
    frame = read_user_embeddings(tmp_path / "rolling").to_pandas()
    clicks = events[events.label == 1]
    expected = {(u, t) for u, t in rows.drop_duplicates().itertuples(index=False) if (clicks[(clicks.user_id == u)].ts < t).any()}
    assert set(zip(frame.user_id, frame.event_timestamp)) == expected


def test_snapshots_for_rows_are_the_full_jobs_vectors_that_those_rows_join(model, torch_engine, events_file, tmp_path):
    """--for-rows: a user is embedded at an as-of time only when one of its rows joins that snapshot (the newest at or
    before the row), and at the last as-of time always; each vector equals the full daily job's."""
    folder, _ = model
    events = pq.read_table(events_file).to_pandas()
    times = pd.date_range("2025-01-10", "2025-01-20", freq="1D", tz="UTC")
    as_of = ",".join(t.isoformat() for t in times)
    rows = events[events.user_id.isin(["u1", "u2", "u3", "u4"])][["user_id", "ts"]].copy()
    rows = rows[(rows.ts >= times[0]) & (rows.ts < times[-1])]
    rows_file = tmp_path / "rows.parquet"
    rows.to_parquet(rows_file)
    config = EmbedJobConfig(engine="torch", shards=2, conditions="surface=home,surface=cart")
    jobs = {}
    for name, parsed in (("full", AsOf.parse(as_of)), ("needed", AsOf.parse(as_of, for_rows=str(rows_file)))):
        job = EmbeddingJob(folder, events_file, parsed, tmp_path / name, config)
        job.open_engine(torch_engine)
        job.run(progress=False)
        jobs[name] = read_user_embeddings(tmp_path / name).to_pandas().set_index(["user_id", "event_timestamp", "condition"])
    full, needed = jobs["full"], jobs["needed"]
    joined = {(u, times[times <= t].max()) for u, t in rows.itertuples(index=False)}
    everyone_last = {(u, t) for u, t in full.index.droplevel("condition").unique() if t == times[-1]}
    expected = {(u, t) for u, t in joined | everyone_last if (u, t) in set(full.index.droplevel("condition"))}
    assert set(needed.index.droplevel("condition").unique()) == expected
    assert len(expected) < len(full.index.droplevel("condition").unique()) / 3  # most (user, day) pairs are never joined
    for key in needed.index:
        np.testing.assert_allclose(needed.embedding[key], full.embedding[key], atol=1e-5)
    with pytest.raises(EmbedJobError, match="for-rows"):
        AsOf.parse(f"rows:{rows_file}", for_rows=str(rows_file))


def test_pca_and_float16(model, torch_engine, events_file, tmp_path):
    folder, _ = model
    job = EmbeddingJob(folder, events_file, AsOf(times=(AS_OF,)), tmp_path / "pca", EmbedJobConfig(engine="torch", shards=2, dim=8, output_dtype="float16"))
    job.open_engine(torch_engine)
    job.run(progress=False)
    frame = read_user_embeddings(tmp_path / "pca").to_pandas()
    vectors = np.stack(frame.embedding)
    assert vectors.shape[1] == 8
    assert np.array_equal(vectors, vectors.astype(np.float16).astype(np.float32))
    components = np.load(tmp_path / "pca" / "pca.npz")["components"]
    assert components.shape == (8, 64)
    items = pq.read_table(tmp_path / "pca" / "items.parquet").to_pandas()
    assert len(items.embedding.iloc[0]) == 8


def test_bfloat16_vectors_round_as_torch_does_and_store_smaller(model, torch_engine, events_file, tmp_path):
    folder, _ = model
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        job = EmbeddingJob(folder, events_file, AsOf(times=(AS_OF,)), tmp_path / dtype, EmbedJobConfig(engine="torch", shards=1, output_dtype=dtype))
        job.open_engine(torch_engine)
        job.run(progress=False)
        sizes[dtype] = sum(p.stat().st_size for p in (tmp_path / dtype / "users").glob("*.parquet"))
    full = np.stack(read_user_embeddings(tmp_path / "float32").to_pandas().embedding)
    half = np.stack(read_user_embeddings(tmp_path / "bfloat16").to_pandas().embedding)
    assert half.dtype == np.float32  # what the ranker reads, unchanged
    np.testing.assert_array_equal(half, torch.from_numpy(full).to(torch.bfloat16).float().numpy())
    assert sizes["bfloat16"] < 0.6 * sizes["float32"], sizes
    items = pq.read_table(tmp_path / "bfloat16" / "items.parquet").to_pandas()
    vectors = np.stack(items.embedding)
    np.testing.assert_array_equal(vectors, torch.from_numpy(vectors).to(torch.bfloat16).float().numpy())  # already bf16 values


def test_a_killed_job_resumes_to_the_same_result(model, events_file, tmp_path):
    folder, _ = model
    args = ["--model", str(folder), "--events", str(events_file), "--as-of", "2025-01-12,2025-01-20,2025-01-28", "--engine", "torch", "--shards", "12"]
    lum = Path(sys.executable).parent / "lum"
    straight = subprocess.run([str(lum), "embed", *args, "--out", str(tmp_path / "straight")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "resumed"
    proc = subprocess.Popen([str(lum), "embed", *args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = json.loads(manifest.read_text())
    assert not finished["complete"] and 0 < len(finished["shards"]) < 12, "the job was not interrupted mid-way"
    final_names = {p.name for p in (out / "users").iterdir() if not p.name.startswith(".")}
    assert final_names == {s["file"] for s in finished["shards"].values()}  # no partial shard under a final name
    resumed = subprocess.run([str(lum), "embed", *args, "--out", str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_user_embeddings(out).equals(read_user_embeddings(tmp_path / "straight"))


def test_bad_input(model, events_file, tmp_path):
    folder, tokenizer = model
    with pytest.raises(ValueError, match=r"unknown query condition\(s\) surface=moon; this model knows: .*surface=home"):
        EmbeddingJob(folder, events_file, AsOf(times=(AS_OF,)), tmp_path / "o", EmbedJobConfig(engine="torch", conditions="surface=moon"))
    with pytest.raises(EmbedJobError, match="is not a LUM model folder"):
        EmbeddingJob(tmp_path, events_file, AsOf(times=(AS_OF,)), tmp_path / "o", EmbedJobConfig(engine="torch"))
    with pytest.raises(EmbedJobError, match="not after the first event"):
        EmbeddingJob(folder, events_file, AsOf.parse("2020-01-01"), tmp_path / "o", EmbedJobConfig(engine="torch"))
    with pytest.raises(EmbedJobError, match="cannot read as-of"):
        AsOf.parse("yesterday-ish")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] += 5
    (broken / "config.json").write_text(json.dumps(config))
    from lum.model import ModelFolderError

    # config.json no longer fits the weights: refused before any engine builds a model from it
    with pytest.raises(ModelFolderError, match=r"model.embed_tokens.weight \[(\d+), 64\], config \[\d+, 64\]"):
        EmbeddingJob(broken, events_file, AsOf(times=(AS_OF,)), tmp_path / "o", EmbedJobConfig(engine="torch"))
    job = EmbeddingJob(folder, events_file, AsOf(times=(AS_OF,)), tmp_path / "o", EmbedJobConfig(engine="torch", shards=2))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "manifest.json").write_text(json.dumps({"settings": {"other": 1}, "shards": {}}))
    with pytest.raises(EmbedJobError, match="made with other settings"):
        job.run(progress=False)


def test_damaged_or_swapped_weights_are_refused_before_any_engine_loads_them(model, events_file, tmp_path):
    """The manifest records the weights' sha256; a changed file would embed random vectors under the same version."""
    from lum.model import ModelFolderError, load_model

    folder, _ = model
    cases = {}
    flipped = tmp_path / "flipped"
    shutil.copytree(folder, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.choice(np.arange(1024, len(data)), size=2000, replace=False):  # past the header: the file still parses
        data[i] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(data))
    cases["flipped"] = (flipped, "is not the file its manifest recorded")
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    (truncated / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    cases["truncated"] = (truncated, "is not the file its manifest recorded")
    unhashed = tmp_path / "unhashed"
    shutil.copytree(folder, unhashed)
    manifest = json.loads((unhashed / "lum_manifest.json").read_text())
    manifest.pop("weights_sha256")
    (unhashed / "lum_manifest.json").write_text(json.dumps(manifest))
    cases["unhashed"] = (unhashed, "records no weights_sha256")
    # another model's weights with the hash re-recorded over them (as a hand-edited manifest would): the shapes tell
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    tensors = load_file(other / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][: tensors[name].shape[0] // 2].contiguous()
    tensors.pop("model.norm.weight")
    save_file(tensors, str(other / "model.safetensors"))
    manifest = json.loads((other / "lum_manifest.json").read_text())
    manifest["weights_sha256"] = hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest()
    (other / "lum_manifest.json").write_text(json.dumps(manifest))
    cases["other model"] = (other, r"does not hold the tensors .*config.json describes \(model.norm.weight missing; "
                                   r"model.layers.0.mlp.up_proj.weight \[\d+, \d+\], config \[\d+, \d+\]\)")
    for name, (bad, message) in cases.items():
        with pytest.raises(ModelFolderError, match=message):
            EmbeddingJob(bad, events_file, AsOf(times=(AS_OF,)), tmp_path / f"o-{name}", EmbedJobConfig(engine="torch"))
        with pytest.raises(ModelFolderError, match=message):
            load_model(bad)
    result = CliRunner().invoke(main, ["embed", "--model", str(flipped), "--events", str(events_file), "--as-of", "2025-01-20",
                                       "--engine", "torch", "--out", str(tmp_path / "cli")])
    assert result.exit_code != 0 and "model.safetensors is not the file its manifest recorded" in result.output


def test_the_log_is_read_once_and_each_shard_reads_only_its_own_users(model, torch_engine, events_file, tmp_path):
    """One pass splits the log by user shard; a shard then needs nothing else (the log moved away) and gives what
    a pass filtering the whole log gives; the split is removed when the job completes."""
    folder, _ = model
    config = EmbedJobConfig(engine="torch", shards=4)
    log = tmp_path / "events.parquet"
    shutil.copy(events_file, log)
    job = EmbeddingJob(folder, log, AsOf(times=(AS_OF,)), tmp_path / "split", config)
    job.open_engine(torch_engine)
    job.partition_inputs()
    parts = sorted((tmp_path / "split" / PARTITIONS_DIR / "events").glob("*.parquet"))
    assert len(parts) == 4
    for shard, part in enumerate(parts):
        users = pq.read_table(part, columns=["user_id"]).column("user_id").to_numpy(zero_copy_only=False).astype(str)
        assert len(users) and (shard_of(users, 4) == shard).all(), f"{part.name} holds another shard's users"
    whole = pq.read_table(events_file, columns=job.event_columns).to_pandas()
    split = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
    key = ["user_id", "ts", "item_id"]
    pd.testing.assert_frame_equal(split.sort_values(key, kind="stable").reset_index(drop=True),
                                  whole.sort_values(key, kind="stable").reset_index(drop=True))

    reference = EmbeddingJob(folder, events_file, AsOf(times=(AS_OF,)), tmp_path / "filtering", config)  # never split
    reference.open_engine(torch_engine)
    expected = [reference.embed_shard(s) for s in range(4)]
    log.rename(tmp_path / "moved.parquet")  # a shard that read the log now would fail
    for shard, (rows, matrix, counts) in enumerate(expected):
        got_rows, got_matrix, got_counts = job.embed_shard(shard)
        pd.testing.assert_frame_equal(got_rows, rows)
        np.testing.assert_array_equal(got_matrix, matrix)
        assert got_counts == counts
    (tmp_path / "moved.parquet").rename(log)
    assert job.run(progress=False)["complete"] and not (tmp_path / "split" / PARTITIONS_DIR).exists()


def test_ray_data_run_writes_the_same_shards(model, torch_engine, events_file, tmp_path):
    import ray

    folder, _ = model
    config = EmbedJobConfig(engine="torch", shards=4)
    local = EmbeddingJob(folder, events_file, AsOf(times=(AS_OF,)), tmp_path / "local", config)
    local.open_engine(torch_engine)
    local.run(progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        distributed = EmbeddingJob(folder, events_file, AsOf(times=(AS_OF,)), tmp_path / "ray", config)
        manifest = distributed.run(progress=False, ray_actors=2)
    finally:
        ray.shutdown()
    assert distributed.engine is None  # every shard was embedded by the actors
    assert manifest["complete"] and len(manifest["shards"]) == 4
    assert read_user_embeddings(tmp_path / "ray").equals(read_user_embeddings(tmp_path / "local"))


def test_request_condition_queries_each_rows_own_context(model, torch_engine, tiny_sim):
    """`request` asks each row's own condition: the same vector as naming that condition explicitly."""
    _, tokenizer = model
    events = tiny_sim[0].to_pandas()
    rows = events.drop_duplicates(["user_id", "ts"]).iloc[:60][["user_id", "ts", "surface", "device", "daypart"]]
    rows = rows.assign(key=rows.ts)
    requested, _ = build_queries(tokenizer, events, rows, resolve_conditions(tokenizer, "request"), max_history=40, window_stride=8)
    got = {(g.user_id, k): v for g in requested for (k, _), v in zip(g.keys, torch_engine.embed([g])[0])}
    own = tokenizer.condition_ids(rows)
    assert len(set(own.tolist())) > 3  # the rows really have different contexts
    checked = 0
    for (_, row), token in zip(rows.iterrows(), own):
        name = tokenizer.vocab[token][2:]
        single, _ = build_queries(tokenizer, events, rows.loc[[row.name]], resolve_conditions(tokenizer, [name]), 40, 8)
        if not single:
            continue  # no history before this row
        np.testing.assert_allclose(got[(row.user_id, row.ts)], torch_engine.embed(single)[0][0], atol=1e-5)
        checked += 1
    assert checked > 20


def test_request_condition_needs_rows_with_context(model, events_file, tmp_path):
    folder, _ = model
    with pytest.raises(EmbedJobError, match="rolling mode"):
        EmbeddingJob(folder, events_file, AsOf(times=(AS_OF,)), tmp_path / "o", EmbedJobConfig(engine="torch", conditions="request"))
    rows = tmp_path / "rows.parquet"
    pq.write_table(pq.read_table(events_file, columns=["user_id", "ts"]), rows)
    with pytest.raises(EmbedJobError, match="condition column"):
        EmbeddingJob(folder, events_file, AsOf(rows_path=str(rows)), tmp_path / "o", EmbedJobConfig(engine="torch", conditions="request"))


def test_a_semantic_id_model_gets_an_item_vector_for_every_item(events_file, tiny_sim, tmp_path):
    """Semantic ids have no item tokens: the item table holds each item's first-code row (the query's own logit)."""
    from lum.pretrain import PretrainConfig, pretrain
    from lum.tokenizer import TokenizerConfig

    events, items = tiny_sim
    folder = tmp_path / "semantic"
    config = TokenizerConfig(("surface", "device", "daypart"), item_tokenization="semantic", semantic_codebook_size=16,
                             categorical_columns=("category",), vector_column="content")
    pretrain(events.to_pandas(), folder, PretrainConfig(preset="tiny", max_steps=3, rows_per_batch=4, row_tokens=512), config, items.to_pandas(),
             progress=False)
    tokenizer = BehaviourTokenizer.load(folder)
    job = EmbeddingJob(folder, events_file, AsOf(times=(AS_OF,)), tmp_path / "out", EmbedJobConfig(engine="torch", shards=1, conditions="surface=home"))
    job.open_engine(TorchEngine(str(folder)))
    job.run(progress=False)
    table = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas()
    assert sorted(table.item_id) == sorted(items.column("item_id").to_pylist())
    head = load_model(folder).model.lm_head.weight.detach().numpy()
    first_codes = tokenizer.item_ids(table.item_id)[:, 0]
    np.testing.assert_allclose(np.stack(table.embedding), head[first_codes], atol=1e-6)
    assert table.token.str.startswith("S0:").all()
