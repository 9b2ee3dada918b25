"""Generative retrieval: the trie, the constrained beam search against exhaustive scoring, torch against vLLM, the
`lum retrieve` job (contract, resume, time), the cold-item test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from contracts.candidates import CANDIDATE_SCHEMA, CandidateFolderError, read_candidate_manifest, read_candidates
from lum.config import VllmSettings
from lum.embed import QueryGroup, build_queries, resolve_conditions
from lum.embed_job import AsOf
from lum.evaluate import EvalConfig, evaluate_next_item, hold_out_items
from lum.model import load_model
from lum.retrieve import ItemTrie, TorchRetrievalEngine, VllmRetrievalEngine, beam_search
from lum.retrieve_job import RetrievalJob, RetrieveJobConfig, RetrieveJobError
from lum.tokenizer import BehaviourTokenizer
from pipelines.cli import main

pytestmark = pytest.mark.e2e  # two LMs pretrained per module, vLLM, `lum retrieve`

AS_OF = pd.Timestamp("2025-01-20", tz="UTC")
CONDITIONS = ("surface", "device", "daypart")


@pytest.fixture(scope="module")
def windows(tiny_sim):
    from pipelines.data.split import SplitConfig, split_events

    events, items = tiny_sim
    tables, _ = split_events(events, SplitConfig("per-user"))
    return {name: table.to_pandas() for name, table in tables.items()}, items.to_pandas()


@pytest.fixture(scope="module")
def cold_models(tmp_path_factory, windows):
    """A semantic-id and an id LM pretrained on the per-user pretraining window without 5% of its items (TIGER's
    cold-start protocol): (semantic folder, id folder, cold items)."""
    from lum.pretrain import PretrainConfig, pretrain
    from lum.tokenizer import TokenizerConfig

    tables, items = windows
    cold = hold_out_items(tables["pretrain"], 0.05, seed=0)
    warm = tables["pretrain"][~tables["pretrain"].item_id.astype(str).isin(set(cold))]
    root = tmp_path_factory.mktemp("retrieve")
    config = PretrainConfig(preset="tiny", epochs=3, rows_per_batch=4, row_tokens=512)
    semantic = TokenizerConfig(CONDITIONS, item_tokenization="semantic", semantic_codebook_size=16, semantic_levels=2,
                               categorical_columns=("category",), vector_column="content")
    pretrain(warm, root / "semantic", config, semantic, items, progress=False)
    pretrain(warm, root / "id", config, TokenizerConfig(CONDITIONS), items, progress=False)
    return root / "semantic", root / "id", cold


@pytest.fixture(scope="module")
def events_file(tmp_path_factory, tiny_sim) -> Path:
    path = tmp_path_factory.mktemp("retrieve_events") / "events.parquet"
    pq.write_table(tiny_sim[0], path)
    return path


def _groups(folder: Path, events: pd.DataFrame, users: int = 12, conditions: int = 2) -> list[QueryGroup]:
    tokenizer = BehaviourTokenizer.load(folder)
    picked = sorted(events.user_id.unique())[:users]
    queries = pd.DataFrame({"user_id": picked, "ts": AS_OF, "key": AS_OF})
    groups, _ = build_queries(tokenizer, events, queries, resolve_conditions(tokenizer, "all")[:conditions], 40, 8,
                              tokenizer.config.prompt_align)
    return groups


@torch.no_grad()
def _exhaustive(folder: Path, trie: ItemTrie, prompt: np.ndarray) -> list[tuple[str, float]]:
    """Every catalogue item's log-probability under the constraint, by plain forward passes over full sequences."""
    model = load_model(folder).model
    sequences = sorted(trie.items)
    ids = torch.as_tensor(np.stack([np.concatenate([prompt, seq]) for seq in sequences]))
    logits = model(input_ids=ids).logits  # [N, T, V]
    scores = []
    for row, seq in enumerate(sequences):
        total = 0.0
        for level in range(trie.depth):
            allowed = trie.children[seq[:level]]
            step = torch.log_softmax(logits[row, len(prompt) - 1 + level, torch.as_tensor(allowed)], dim=0)
            total += float(step[list(allowed).index(seq[level])])
        scores += [(item, total) for item in trie.items[seq]]
    return sorted(scores, key=lambda e: (-e[1], e[0]))


def test_the_trie_holds_exactly_the_catalogue(cold_models, windows):
    semantic, identity, _ = cold_models
    _, items = windows
    tokenizer = BehaviourTokenizer.load(semantic)
    trie = ItemTrie.from_tokenizer(tokenizer)
    assert trie.depth == 3 and trie.n_items == len(items) and trie.unreachable == 0  # every item has content codes
    for sequence, names in trie.items.items():
        for item in names:
            assert tuple(tokenizer.item_ids(pd.Series([item]))[0]) == sequence
        for level in range(trie.depth):
            assert sequence[level] in trie.children[sequence[:level]]
    assert all((np.diff(c) > 0).all() for c in trie.children.values())
    # id mode: only the items with a token of their own; a catalogue item without one is counted, not generated
    id_tokenizer = BehaviourTokenizer.load(identity)
    own = sorted(t[2:] for t in id_tokenizer.vocab if t.startswith("I:"))
    id_trie = ItemTrie.from_tokenizer(id_tokenizer)
    assert id_trie.depth == 1 and sorted(i for names in id_trie.items.values() for i in names) == own
    restricted = ItemTrie.from_tokenizer(id_tokenizer, own[:5] + ["no-such-item"])
    assert restricted.n_items == 5 and restricted.unreachable == 1
    with pytest.raises(ValueError, match="holds no item the model can generate"):
        ItemTrie.from_tokenizer(id_tokenizer, ["no-such-item"])
    for empty in (tokenizer, id_tokenizer):  # an empty catalogue: the same one-line error, no IndexError (issue 35)
        with pytest.raises(ValueError, match="holds no item the model can generate"):
            ItemTrie.from_tokenizer(empty, [])


def test_a_wide_beam_search_is_exhaustive_scoring_and_a_narrow_one_returns_real_items(cold_models, windows):
    semantic, _, _ = cold_models
    tables, _ = windows
    trie = ItemTrie.from_tokenizer(BehaviourTokenizer.load(semantic))
    engine = TorchRetrievalEngine(str(semantic))
    groups = _groups(semantic, tables["pretrain"], users=3, conditions=2)
    wide = beam_search(engine, trie, groups, beam=400, top=400)
    for group, lists in zip(groups, wide):
        for q, found in enumerate(lists):
            expected = _exhaustive(semantic, trie, group.prompts()[q])
            assert [i for i, _ in found] == [i for i, _ in expected]
            np.testing.assert_allclose([s for _, s in found], [s for _, s in expected], atol=1e-4)
            assert np.logaddexp.reduce([s for _, s in found]) == pytest.approx(0.0, abs=1e-4)  # a distribution over the catalogue
    narrow = beam_search(engine, trie, groups, beam=4, top=30)
    catalogue = {i for names in trie.items.values() for i in names}
    for lists, wide_lists in zip(narrow, wide):
        for found, full in zip(lists, wide_lists):
            names = [i for i, _ in found]
            assert len(names) == 30 == len(set(names)) and set(names) <= catalogue
            assert all(a[1] >= b[1] for a, b in zip(found, found[1:]))
            exact = dict(full)
            np.testing.assert_allclose([s for _, s in found], [exact[i] for i in names], atol=1e-4)  # scores are exact, the search is what narrows


def test_an_id_model_retrieves_its_top_item_logits(tiny_lm, tiny_sim):
    folder, _ = tiny_lm
    tokenizer = BehaviourTokenizer.load(folder)
    trie = ItemTrie.from_tokenizer(tokenizer)
    groups = _groups(folder, tiny_sim[0].to_pandas(), users=6, conditions=2)
    found = beam_search(TorchRetrievalEngine(str(folder)), trie, groups, beam=20, top=15)
    model = load_model(folder).model
    item_tokens = tokenizer.item_token_ids()
    for group, lists in zip(groups, found):
        for prompt, got in zip(group.prompts(), lists):
            with torch.no_grad():
                logits = model(input_ids=torch.as_tensor(prompt)[None]).logits[0, -1, torch.as_tensor(item_tokens)]
            best = item_tokens[torch.argsort(logits, descending=True)[:15].numpy()]
            assert [i for i, _ in got] == [tokenizer.vocab[t][2:] for t in best]


def test_vllm_and_torch_engines_return_the_same_top_n(cold_models, tiny_lm, windows):
    """The production engine against the reference, on a semantic-id model (beam search) and an id model (top-k)."""
    tables, _ = windows
    for folder in (cold_models[0], tiny_lm[0]):
        trie = ItemTrie.from_tokenizer(BehaviourTokenizer.load(folder))
        groups = _groups(folder, tables["pretrain"], users=20, conditions=2)
        reference = beam_search(TorchRetrievalEngine(str(folder)), trie, groups, beam=20, top=50)
        engine = VllmRetrievalEngine(str(folder), max_model_len=2048, max_logprobs=50, settings=VllmSettings(dtype="float32"))
        try:
            served = beam_search(engine, trie, groups, beam=20, top=50)
        finally:
            engine.close()
        for ref_lists, vllm_lists in zip(reference, served):
            for ref, got in zip(ref_lists, vllm_lists):
                assert [i for i, _ in got] == [i for i, _ in ref]
                np.testing.assert_allclose([s for _, s in got], [s for _, s in ref], atol=1e-4)


def test_retrieve_job_writes_the_candidates_contract_and_resumes(cold_models, events_file, tmp_path):
    semantic, _, _ = cold_models
    config = RetrieveJobConfig(engine="torch", shards=4, top=10, conditions="surface=home,surface=search")
    straight = RetrievalJob(semantic, events_file, AsOf(times=(AS_OF,)), tmp_path / "straight", config)
    manifest = straight.run(progress=False)
    table = read_candidates(tmp_path / "straight")
    assert table.schema == CANDIDATE_SCHEMA
    frame = table.to_pandas()
    per_query = frame.groupby(["user_id", "condition"])
    assert (per_query.size() == 10).all() and set(frame.condition) == {"surface=home", "surface=search"}
    assert (per_query["rank"].apply(lambda r: r.tolist() == list(range(10)))).all()
    assert (per_query["score"].apply(lambda s: s.is_monotonic_decreasing)).all() and (frame.score <= 0).all()
    assert (frame.event_timestamp == AS_OF).all() and manifest["totals"]["rows"] == len(frame)
    assert manifest["totals"]["queries"] == 2 * frame.user_id.nunique() and manifest["catalogue_items"] == 300

    class Interrupted(Exception):
        pass

    class StopsAfterTwoShards(RetrievalJob):
        done = 0

        def retrieve_shard(self, shard, bar=None):
            if self.done == 2:
                raise Interrupted
            self.done += 1
            return super().retrieve_shard(shard, bar)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        StopsAfterTwoShards(semantic, events_file, AsOf(times=(AS_OF,)), out, config).run(progress=False)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 2
    assert {p.name for p in (out / "users").iterdir()} == {s["file"] for s in partial["shards"].values()}  # no half-written shard
    with pytest.raises(CandidateFolderError, match="has not finished"):
        read_candidates(out)
    RetrievalJob(semantic, events_file, AsOf(times=(AS_OF,)), out, config).run(progress=False)
    assert read_candidates(out).equals(table)
    with pytest.raises(RetrieveJobError, match="other settings"):
        RetrievalJob(semantic, events_file, AsOf(times=(AS_OF,)), out, RetrieveJobConfig(engine="torch", shards=4, top=20,
                     conditions="surface=home,surface=search")).run(progress=False)


def test_candidates_never_depend_on_events_at_or_after_the_as_of_time(cold_models, tiny_sim, tmp_path):
    semantic, _, _ = cold_models
    events = tiny_sim[0].to_pandas()
    later = events.ts >= AS_OF
    changed = events.copy()
    changed.loc[later, "item_id"] = changed.loc[later, "item_id"].sample(frac=1.0, random_state=1).to_numpy()  # other items, later
    changed = pd.concat([changed, changed[later].assign(ts=AS_OF)], ignore_index=True)  # and more events exactly at the as-of time
    config = RetrieveJobConfig(engine="torch", shards=1, top=20, conditions="surface=home")
    tables = []
    for name, frame in (("original", events), ("changed", changed)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
        RetrievalJob(semantic, path, AsOf(times=(AS_OF,)), tmp_path / name, config).run(progress=False)
        tables.append(read_candidates(tmp_path / name).to_pandas())
    pd.testing.assert_frame_equal(tables[0], tables[1])


def test_rolling_rows_get_candidates_from_their_own_past(cold_models, events_file, tmp_path):
    semantic, _, _ = cold_models
    events = pq.read_table(events_file).to_pandas()
    rows = events[events.user_id.isin(["u1", "u2"])][["user_id", "ts", *CONDITIONS]].iloc[::5]
    rows_path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), rows_path)
    config = RetrieveJobConfig(engine="torch", shards=2, top=5, conditions="request")
    manifest = RetrievalJob(semantic, events_file, AsOf(rows_path=str(rows_path)), tmp_path / "rolling", config).run(progress=False)
    frame = read_candidates(tmp_path / "rolling").to_pandas()
    totals = manifest["totals"]
    assert frame.groupby(["user_id", "event_timestamp"]).ngroups == totals["queries"] > 0
    assert totals["queries"] + totals["queries_without_history"] == len(rows.drop_duplicates(["user_id", "ts"]))
    assert set(frame.event_timestamp) <= set(pd.to_datetime(rows.ts, utc=True)) and set(frame.condition) == {"request"}


def test_the_retrieval_jobs_settings_are_the_embedding_jobs_with_its_own(cold_models, events_file, tmp_path):
    """One definition of a job's settings (EmbeddingJob._settings): the shared keys equal, in the manifest's order,
    each job's own input file fingerprinted after `rows` and its own options last."""
    from lum.config import EmbedJobConfig
    from lum.embed_job import EmbeddingJob

    semantic, _, _ = cold_models
    rows = pq.read_table(events_file).to_pandas()[["user_id", "ts", *CONDITIONS]].iloc[:20]
    rows_path, catalogue = tmp_path / "rows.parquet", tmp_path / "catalogue.parquet"
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), rows_path)
    pq.write_table(pa.table({"item_id": ["i1", "i2"]}), catalogue)
    as_of = AsOf(rows_path=str(rows_path))
    embed = EmbeddingJob(semantic, events_file, as_of, tmp_path / "e", EmbedJobConfig(engine="torch", shards=2, conditions="request"))
    retrieve = RetrievalJob(semantic, events_file, as_of, tmp_path / "r", RetrieveJobConfig(engine="torch", shards=2, top=5, conditions="request"),
                            catalogue=catalogue)
    shared = ["model_version", "events", "as_of", "rows", "conditions", "max_history", "prompt_align", "window_stride", "shards"]
    mine, theirs = embed.settings(), retrieve.settings()
    assert list(mine) == [*shared[:4], "for_rows", *shared[4:], "output_dtype", "dim"]
    assert list(theirs) == [*shared[:4], "catalogue", *shared[4:], "top", "beam"]
    assert {k: mine[k] for k in shared} == {k: theirs[k] for k in shared} and mine["rows"] is not None and mine["prompt_align"] == 1
    assert mine["for_rows"] is None and theirs["catalogue"] is not None and (theirs["top"], theirs["beam"]) == (5, retrieve.config.beam)


def test_retrieve_bad_input(cold_models, events_file, tmp_path):
    semantic, _, _ = cold_models
    config = RetrieveJobConfig(engine="torch", shards=1, top=5, conditions="surface=home")
    no_column = tmp_path / "catalogue.parquet"
    pq.write_table(pa.table({"item": ["i1"]}), no_column)
    with pytest.raises(RetrieveJobError, match=r"catalogue.parquet: the catalogue needs an item_id column \(has: item\)"):
        RetrievalJob(semantic, events_file, AsOf(times=(AS_OF,)), tmp_path / "o", config, catalogue=no_column)
    unknown = tmp_path / "unknown.parquet"
    pq.write_table(pa.table({"item_id": ["not-an-item"]}), unknown)
    with pytest.raises(ValueError, match="holds no item the model can generate"):
        RetrievalJob(semantic, events_file, AsOf(times=(AS_OF,)), tmp_path / "o", config, catalogue=unknown)
    with pytest.raises(RetrieveJobError, match="--for-rows is an embedding-job option"):
        RetrievalJob(semantic, events_file, AsOf(times=(AS_OF,), for_rows=str(events_file)), tmp_path / "o", config)
    with pytest.raises(ValueError, match=r"unknown query condition\(s\) surface=moon"):
        RetrievalJob(semantic, events_file, AsOf(times=(AS_OF,)), tmp_path / "o", RetrieveJobConfig(engine="torch", conditions="surface=moon"))
    # a manifest placed by someone else: a shard file name that leaves the folder is refused, as is an embedding folder
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "manifest.json").write_text(json.dumps({"kind": "candidates", "settings": {"model_version": "m1"},
                                                       "shards": {"0": {"file": "../../etc/passwd"}}, "complete": True}))
    with pytest.raises(CandidateFolderError, match=r"shards.0.file' is '../../etc/passwd'"):
        read_candidate_manifest(hostile)
    (hostile / "manifest.json").write_text(json.dumps({"settings": {"model_version": "m1"}, "shards": {}}))
    with pytest.raises(CandidateFolderError, match="not the manifest of a candidates folder"):
        read_candidates(hostile)


def test_lum_retrieve_command(cold_models, events_file, tmp_path):
    semantic, _, _ = cold_models
    catalogue = tmp_path / "catalogue.parquet"
    pq.write_table(pa.table({"item_id": [f"i{n}" for n in range(0, 300, 3)]}), catalogue)
    args = ["retrieve", "--model", str(semantic), "--events", str(events_file), "--as-of", "2025-01-20", "--engine", "torch",
            "--top", "7", "--beam", "10", "--shards", "2", "--conditions", "surface=cart", "--catalogue", str(catalogue), "--out", str(tmp_path / "c")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "top 7, from 100 items" in result.output
    frame = read_candidates(tmp_path / "c").to_pandas()
    assert set(frame.item_id) <= {f"i{n}" for n in range(0, 300, 3)} and (frame.groupby("user_id").size() == 7).all()


def test_cold_items_are_retrieved_by_a_semantic_id_model_and_never_by_an_id_model(cold_models, windows):
    """TIGER's cold-start test: items held out of pretraining get codes from content and can be generated."""
    semantic, identity, cold = cold_models
    tables, _ = windows
    history = pd.concat([tables["pretrain"], tables["train"]], ignore_index=True)
    config = EvalConfig(max_users=None, sasrec=False, recall_k=50)
    results = {}
    for name, folder in (("semantic", semantic), ("id", identity)):
        tokenizer = BehaviourTokenizer.load(folder)
        results[name] = evaluate_next_item(load_model(folder).model, tokenizer, history, tables["test"], config, cold_items=cold)
    sem, ids = results["semantic"]["cold_items"], results["id"]["cold_items"]
    assert sem["held_out"] == ids["held_out"] == len(cold) == round(0.05 * tables["pretrain"].item_id.nunique())
    assert sem["model"]["cold_share_of_top10"] > 0 and sem["model"]["users_with_cold_in_top10"] > 0
    assert ids["model"]["cold_share_of_top10"] == 0 and ids["model"]["cold_recall@50"] in (0.0, None)
    assert results["semantic"]["target_not_generable"] == 0.0
    # popularity is computed on the history, which holds the cold items' later events: it may list them, the id model may not
    assert sem["popularity"] == ids["popularity"]
