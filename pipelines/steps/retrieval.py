"""The retrieval A/B step of a simulator run: LUM-retrieved candidates merged into the logged test slates.

For a seeded sample of the test window's requests, the split's LM generates the top `added` items for each request's
user from the behaviours strictly before the request, under the request's own context (`lum retrieve`'s job,
rolling rows, the `request` condition); popularity (the most clicked items before the test window) is the
comparison retriever. pipelines/steps/retrieval_ab.py judges the sets with the simulator's true relevance of every
item at the request, which `simulate_with_truth` recomputes from the run's own simulator settings (the same seed
gives the same events: checked on the sampled requests' slates before anything is measured).

Writes `<run>/retrieval/<split>.json`: the settings and the table (the report's retrieval section).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contracts.files import write_json_atomic
from pipelines.paths import RunPaths


def retrieval_ab_table(truth: Any, item_ids: list[str], before: pd.DataFrame, test: pd.DataFrame, model_dir: Path, events_path: Path,
                       requests: int, added: int, beam: int, engine: str, position_decay: float, progress: bool = True) -> dict[str, Any]:
    """The retrieval A/B (pipelines.steps.retrieval_ab.retrieval_ab) of `requests` sampled test requests:
    {"table": its rows, "sample": the requests (one test row each), "sets": {set name: [R] item indices}}.

    before: the events before the test window (the popularity list); test: the test window with request_id."""
    from contracts.candidates import read_candidates
    from lum.config import RetrieveJobConfig
    from lum.embed_job import AsOf
    from lum.retrieve_job import RetrievalJob
    from pipelines.steps.retrieval_ab import RetrievalABConfig, candidate_sets, retrieval_ab

    rng = np.random.default_rng(0)
    all_requests = test.request_id.unique()
    picked = set(rng.choice(all_requests, min(requests, len(all_requests)), replace=False))
    shown = test[test.request_id.isin(picked)]
    sample = shown.drop_duplicates("request_id").reset_index(drop=True)
    item_index = {item: i for i, item in enumerate(item_ids)}
    slates_by_request = shown.groupby("request_id").item_id.apply(lambda s: np.array([item_index[i] for i in s]))
    slates = [slates_by_request[r] for r in sample.request_id]
    index = truth.index_of(sample.request_id.to_numpy())
    shown_index = truth.index_of(shown.request_id.to_numpy())
    stored = shown.relevance.to_numpy()
    recomputed = truth.relevance(shown_index, shown.item_id.map(item_index).to_numpy()[:, None])[:, 0]
    if not np.allclose(stored, recomputed, rtol=0, atol=1e-9):
        raise ValueError("the re-simulated world does not reproduce the run's events (relevance differs): was the log made by another "
                         "version of the simulator?")
    context = [c for c in ("surface", "device", "daypart") if c in sample.columns]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows_path = tmp / "rows.parquet"
        pq.write_table(pa.Table.from_pandas(sample[["user_id", "ts", *context]], preserve_index=False), rows_path)
        # twice the candidates: the LM's catalogue holds items released after a request, dropped below
        job = RetrievalJob(model_dir, events_path, AsOf(rows_path=str(rows_path)), tmp / "candidates",
                           RetrieveJobConfig(engine=engine, conditions="request", top=2 * added, beam=beam, shards=1))
        try:
            job.run(progress=progress)
        finally:
            job.close()
        found = read_candidates(tmp / "candidates").to_pandas()
    lists = found.groupby(["user_id", "event_timestamp"]).item_id.apply(lambda s: np.array([item_index[i] for i in s]))
    times = pd.to_datetime(sample.ts, utc=True)
    released = truth.release_us
    lum = [lists.get((u, t), np.zeros(0, np.int64)) for u, t in zip(sample.user_id, times)]
    lum = [lst[released[lst] <= truth.ts_us[i]][:added] for lst, i in zip(lum, index)]
    popular = before[before.label == 1].item_id.value_counts().index.map(item_index).to_numpy()[: 3 * added]
    popularity = [popular[released[popular] <= truth.ts_us[i]][:added] for i in index]
    retrieved = {"LUM": lum, "popularity": popularity}
    table = retrieval_ab(truth, sample[["request_id", "user_id"]], slates, retrieved, RetrievalABConfig(position_decay=position_decay))
    return {"table": table, "sample": sample, "sets": candidate_sets(truth, index, slates, retrieved)}


def ranker_scores(paths: RunPaths, protocol: str, sample: pd.DataFrame, sets: dict[str, list[np.ndarray]], item_ids: list[str],
                  rankers: list[tuple[str, str]], progress: bool = True) -> dict[str, dict[str, list[np.ndarray]]]:
    """{model/variant: {set name: [R] scores of the set's items}}: each set's (request, item) rows get their point-in-time
    features from the protocol's feature repo (as the test window's rows do) and each trained ranker scores them.

    A set's rows go through the feature store on their own: a request's candidates are compared with each other
    (request features), so the rows of two sets must never share a request."""
    from feature_store.repo import FeatureRepo
    from feature_store.training_set import TrainingSetConfig, build_training_set
    from pipelines.steps.features import context_columns
    from pipelines.steps.rankers import ranker_dir
    from ranker.train import TrainedRanker

    repo = FeatureRepo(paths.feature_repo_of(protocol))
    service = "ranker_lum_pooled" if repo.settings().get("model_version") else "ranker_pooled"  # as the test window's set
    context = context_columns(paths.split_file(protocol, "test"))
    loaded = {f"{m}/{v}": TrainedRanker.load(ranker_dir(paths, protocol, m, v)) for m, v in rankers}
    out: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in loaded}
    names = np.asarray(item_ids, dtype=object)
    for set_name, lists in sets.items():
        which = np.repeat(np.arange(len(lists)), [len(items) for items in lists])
        rows = sample.iloc[which][["user_id", "ts", *context]].reset_index(drop=True)
        rows["item_id"] = names[np.concatenate(lists)] if len(which) else []
        table = build_training_set(repo, rows, TrainingSetConfig(feature_service=service, context_columns=context), progress=progress)
        bounds = np.cumsum([0, *[len(items) for items in lists]])
        for name, ranker in loaded.items():
            scores = ranker.score(table)
            out[name][set_name] = [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def retrieval_ab_step(paths: RunPaths, split: str, model_dir: Path, requests: int, added: int, beam: int, engine: str,
                      rankers: list[tuple[str, str]] = (), progress: bool = True) -> dict[str, Any]:
    """Run the retrieval A/B of one split of a simulator run; write and return `<run>/retrieval/<split>.json`.

    rankers: (model, variant) pairs trained on the split: each orders every candidate set (CTR@10 after the ranker)."""
    from pipelines.data.sources.base import read_dataset_info
    from pipelines.data.sources.simulator import SimulatorConfig, simulate_with_truth
    from pipelines.steps.lm import _window

    info = read_dataset_info(paths)
    source = info.get("source", {})
    if source.get("name") != "simulator":
        raise ValueError("the retrieval A/B needs the simulator's truth: this run's data is not simulated")
    raw = dict(source["config"])
    config = SimulatorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    _, items, truth = simulate_with_truth(config)
    before = pd.concat([_window(paths, split, "pretrain"), _window(paths, split, "train")], ignore_index=True)
    from pipelines.steps.retrieval_ab import RetrievalABConfig, ranked_ctr

    item_ids = items.column("item_id").to_pylist()
    made = retrieval_ab_table(truth, item_ids, before, _window(paths, split, "test"), model_dir, paths.events,
                              requests, added, beam, engine, config.position_decay, progress)
    result = {"split": split, "settings": {"requests": requests, "added": added, "beam": beam, "engine": engine,
                                           "would_click": 10, "ctr_k": 10, "position_decay": config.position_decay},
              "rows": _records(made["table"])}
    if rankers:
        scores = ranker_scores(paths, split, made["sample"], made["sets"], item_ids, list(rankers), progress)
        ranked = ranked_ctr(truth, made["sample"][["request_id", "user_id"]], made["sets"], scores, RetrievalABConfig(position_decay=config.position_decay))
        result["ranked"] = _records(ranked)
    write_json_atomic(result, paths.retrieval_ab(split))
    return result


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The table's rows; a logged row has no lift over itself: its empty cells are left out, not written as NaN."""
    return [{k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))} for row in table.to_dict("records")]
