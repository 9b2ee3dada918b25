"""Retrieval in the simulated A/B: the logging policy's slates against slates with LUM-retrieved candidates merged in.

    python -m benchmarks.bench_retrieval_ab                     # default world, 3,000 users, 2,000 test requests
    python -m benchmarks.bench_retrieval_ab --quick             # `make bench` quick mode: 800 users, 3 epochs, 300 requests

The simulator's world is split by time (the demo's global split); a semantic-id LM (the demo's tokenizer and
tiny preset) is pretrained on the pretraining window; for a seeded sample of the test window's requests,
`lum retrieve`'s job (rolling rows, the `request` condition: each request's own surface, device and part of the
day) generates the top `--added` items from the user's behaviours strictly before the request. Popularity (the
most clicked items before the test window) is the comparison retriever. pipelines/report/ab_retrieval.py then
judges each candidate set with the simulator's true relevance of every item: recall of the request's 10 most
relevant released items (what the user would click) and the CTR@10 the best possible ranker makes of the set,
with 95% intervals and lifts over the logged slates from a paired bootstrap over users. No setting is chosen here:
the LM's are the demo's.

Writes benchmarks/results/retrieval_ab.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000, help="test requests sampled (seeded)")
    parser.add_argument("--added", type=int, default=20, help="candidates each retriever adds to a slate")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--engine", default="torch", choices=["torch", "vllm"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.users, args.epochs, args.requests = 800, 3, 300

    from contracts.candidates import read_candidates
    from lum.config import PretrainConfig, RetrieveJobConfig, TokenizerConfig
    from lum.embed_job import AsOf
    from lum.pretrain import pretrain
    from lum.retrieve_job import RetrievalJob
    from pipelines.data.sources.simulator import preset, simulate_with_truth
    from pipelines.data.split import SplitConfig, split_events
    from pipelines.report.ab_retrieval import RetrievalABConfig, retrieval_ab

    config = preset("default", n_users=args.users, chunk_users=args.users)
    events, items, truth = simulate_with_truth(config)
    tables, _ = split_events(events, SplitConfig("global"))
    windows = {k: v.to_pandas() for k, v in tables.items()}
    test = windows["test"]
    rng = np.random.default_rng(0)
    picked = rng.choice(test.request_id.unique(), min(args.requests, test.request_id.nunique()), replace=False)
    shown = test[test.request_id.isin(set(picked))]
    requests = shown.drop_duplicates("request_id")[["request_id", "user_id", "ts", "surface", "device", "daypart"]].reset_index(drop=True)
    item_index = {item: i for i, item in enumerate(items.column("item_id").to_pylist())}
    slates_by_request = shown.groupby("request_id").item_id.apply(lambda s: np.array([item_index[i] for i in s]))
    slates = [slates_by_request[r] for r in requests.request_id]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "lm"
        tokenizer = TokenizerConfig(("surface", "device", "daypart"), item_tokenization="semantic", vector_column="content",
                                    categorical_columns=("category",), semantic_codebook_size=64, semantic_levels=2)  # configs/demo.yaml
        pretrain(windows["pretrain"], folder, PretrainConfig(preset="tiny", epochs=args.epochs), tokenizer, items.to_pandas(), progress=True)
        events_path, rows_path = tmp / "events.parquet", tmp / "rows.parquet"
        pq.write_table(events, events_path)
        pq.write_table(pa.Table.from_pandas(requests.drop(columns="request_id"), preserve_index=False), rows_path)
        job = RetrievalJob(folder, events_path, AsOf(rows_path=str(rows_path)), tmp / "candidates",
                           RetrieveJobConfig(engine=args.engine, conditions="request", top=2 * args.added, beam=args.beam, shards=4))  # spares: see below
        try:
            job.run()
        finally:
            job.close()
        found = read_candidates(tmp / "candidates").to_pandas()
    found["ts"] = found.event_timestamp
    lists = found.groupby(["user_id", "ts"]).item_id.apply(lambda s: np.array([item_index[i] for i in s]))
    requests["ts"] = pd.to_datetime(requests.ts, utc=True)
    lum = [lists.get((u, t), np.zeros(0, np.int64)) for u, t in zip(requests.user_id, requests.ts)]
    before = pd.concat([windows["pretrain"], windows["train"]])
    popular = before[before.label == 1].item_id.value_counts().index.map(item_index).to_numpy()
    # popularity: the most clicked items before the test window; unreleased ones are dropped in the merge, so take spares
    popularity = [popular[: args.added * 3][truth.release_us[popular[: args.added * 3]] <= truth.ts_us[i]][: args.added]
                  for i in truth.index_of(requests.request_id.to_numpy())]
    # the LM's catalogue holds items released later than a request: those are dropped and the next candidates move up
    lum_released = [lst[truth.release_us[lst] <= truth.ts_us[i]][: args.added] for lst, i in zip(lum, truth.index_of(requests.request_id.to_numpy()))]
    table = retrieval_ab(truth, requests, slates, {"LUM": lum_released, "popularity": popularity},
                         RetrievalABConfig(position_decay=config.position_decay))
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in table.to_dict("records")]
    write_results("retrieval_ab", rows, notes=f"simulator default world, {args.users} users, global split; tiny semantic-id LM, "
                  f"{args.epochs} epochs; {len(requests)} test requests; {args.added} candidates added per retriever "
                  f"(beam {args.beam}); recall of the 10 most relevant released items; oracle CTR@10")


if __name__ == "__main__":
    main()
