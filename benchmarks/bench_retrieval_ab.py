"""Retrieval in the simulated A/B: the logging policy's slates against slates with LUM-retrieved candidates merged in.

    python -m benchmarks.bench_retrieval_ab                     # default world, 3,000 users, 2,000 test requests
    python -m benchmarks.bench_retrieval_ab --quick             # `make bench` quick mode: 800 users, 3 epochs, 300 requests

The simulator's world is split by time (the demo's global split); a semantic-id LM (the demo's tokenizer and
tiny preset) is pretrained on the pretraining window; for a seeded sample of the test window's requests,
`lum retrieve`'s job (rolling rows, the `request` condition: each request's own surface, device and part of the
day) generates the top `--added` items from the user's behaviours strictly before the request. Popularity (the
most clicked items before the test window) is the comparison retriever. pipelines/steps/retrieval_ab.py then
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

import pandas as pd
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

    from lum.config import PretrainConfig, TokenizerConfig
    from lum.pretrain import pretrain
    from pipelines.data.sources.simulator import preset, simulate_with_truth
    from pipelines.data.split import SplitConfig, split_events
    from pipelines.steps.retrieval import retrieval_ab_table

    config = preset("default", n_users=args.users, chunk_users=args.users)
    events, items, truth = simulate_with_truth(config)
    tables, _ = split_events(events, SplitConfig("global"))
    windows = {k: v.to_pandas() for k, v in tables.items()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "lm"
        tokenizer = TokenizerConfig(("surface", "device", "daypart"), item_tokenization="semantic", vector_column="content",
                                    categorical_columns=("category",), semantic_codebook_size=64, semantic_levels=2)  # configs/demo.yaml
        pretrain(windows["pretrain"], folder, PretrainConfig(preset="tiny", epochs=args.epochs), tokenizer, items.to_pandas(), progress=True)
        events_path = tmp / "events.parquet"
        pq.write_table(events, events_path)
        before = pd.concat([windows["pretrain"], windows["train"]], ignore_index=True)
        table = retrieval_ab_table(truth, items.column("item_id").to_pylist(), before, windows["test"], folder, events_path,
                                   args.requests, args.added, args.beam, args.engine, config.position_decay)["table"]
    # the logged row has no lift over itself: its NaN cells are left out (v != v only for NaN)
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if v == v} for row in table.to_dict("records")]
    write_results("retrieval_ab", rows, notes=f"simulator default world, {args.users} users, global split; tiny semantic-id LM, "
                  f"{args.epochs} epochs; {args.requests} test requests sampled; {args.added} candidates added per retriever "
                  f"(beam {args.beam}); recall of the 10 most relevant released items; oracle CTR@10")


if __name__ == "__main__":
    main()
