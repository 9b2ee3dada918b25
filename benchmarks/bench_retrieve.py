"""Generative retrieval throughput and latency: vLLM vs the torch reference, against catalogue size and history length.

    python -m benchmarks.bench_retrieve                  # small preset; catalogues 1k, 10k, 50k; histories 20, 100
    python -m benchmarks.bench_retrieve --quick          # `make bench` quick mode: catalogues 1k, 10k; 40 users

Every cell searches beam 20 / top 100 (lum/retrieve.py) for `--users` users under one condition each, as
`lum retrieve` does: one call per batch of users (users/s, and seconds per user in a batch), and a single user's
search on its own (the latency of one query; median over `--single` users). The catalogue's items get random
content vectors and 3-level semantic ids (64 codes per level, as the demo's codebooks); the model is the preset,
pretrained for a few steps on random histories (speed does not depend on how well it is trained). Histories are
`H` behaviours before the as-of time (5 tokens each: condition, 3 codes, tie-break). Engine start-up is not
timed; each engine gets one warm-up search first. vLLM runs in float32 here (the CPU default when it lacks native
bfloat16) with prefix caching, bound to both cores; the torch engine with 2 threads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import write_results

T0 = pd.Timestamp("2025-01-01", tz="UTC")
SURFACES = ("home", "search", "item_detail", "cart")


def synthetic_world(n_items: int, n_users: int, history: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items with random content vectors; every user has `history` positive behaviours on random items."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [f"i{n}" for n in range(n_items)],
                          "content": list(rng.normal(size=(n_items, 16)).astype(np.float32))})
    users = np.repeat([f"u{u}" for u in range(n_users)], history)
    events = pd.DataFrame({
        "user_id": users,
        "item_id": items.item_id.to_numpy()[rng.integers(0, n_items, len(users))],
        "ts": T0 + pd.to_timedelta(np.tile(np.arange(history), n_users), unit="min"),
        "label": 1,
        "surface": np.array(SURFACES)[rng.integers(0, len(SURFACES), len(users))],
    })
    return events, items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--users", type=int, default=100, help="users per batched search")
    parser.add_argument("--single", type=int, default=5, help="users searched one at a time (latency)")
    parser.add_argument("--catalogues", default="1000,10000,50000")
    parser.add_argument("--histories", default="20,100")
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--engines", default="vllm,torch")
    parser.add_argument("--quick", action="store_true", help="catalogues 1k and 10k, 40 users, 3 single")
    args = parser.parse_args()
    if args.quick:
        args.catalogues, args.users, args.single = "1000,10000", 40, 3

    from lum.config import VllmSettings
    from lum.embed import build_queries, resolve_conditions
    from lum.pretrain import PretrainConfig, pretrain
    from lum.retrieve import ItemTrie, TorchRetrievalEngine, VllmRetrievalEngine, beam_search
    from lum.tokenizer import BehaviourTokenizer, TokenizerConfig

    histories = [int(h) for h in args.histories.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for n_items in (int(c) for c in args.catalogues.split(",")):
            events, items = synthetic_world(n_items, args.users + args.single, max(histories))
            folder = Path(tmp_name) / f"model-{n_items}"
            tokenizer_config = TokenizerConfig(("surface",), item_tokenization="semantic", semantic_levels=3, semantic_codebook_size=64,
                                               vector_column="content", max_history=max(histories), min_condition_count=1)
            pretrain(events, folder, PretrainConfig(preset=args.preset, max_steps=3, rows_per_batch=8, row_tokens=512), tokenizer_config,
                     items, progress=False)
            tokenizer = BehaviourTokenizer.load(folder)
            trie = ItemTrie.from_tokenizer(tokenizer)
            condition = resolve_conditions(tokenizer, ["surface=home"])
            as_of = T0 + pd.Timedelta(days=1)
            users = events.user_id.drop_duplicates().to_numpy()
            queries = pd.DataFrame({"user_id": users, "ts": as_of, "key": as_of})
            prompts = {h: build_queries(tokenizer, events.groupby("user_id").head(h), queries, condition, h, 16,
                                        tokenizer.config.prompt_align)[0] for h in histories}
            for engine_name in args.engines.split(","):
                if engine_name == "vllm":
                    engine = VllmRetrievalEngine(str(folder), 2048, max(args.beam, args.top), VllmSettings(dtype="float32"))
                else:
                    engine = TorchRetrievalEngine(str(folder), threads=2)
                try:
                    beam_search(engine, trie, prompts[histories[0]][:4], args.beam, args.top)  # warm-up
                    for h in histories:
                        batch, single = prompts[h][: args.users], prompts[h][args.users :]
                        if engine_name == "vllm":
                            engine.llm.reset_prefix_cache()  # cold: no history cached by an earlier cell
                        started = time.perf_counter()
                        found = beam_search(engine, trie, batch, args.beam, args.top)
                        seconds = time.perf_counter() - started
                        latencies = []
                        for group in single:
                            started = time.perf_counter()
                            beam_search(engine, trie, [group], args.beam, args.top)
                            latencies.append(time.perf_counter() - started)
                        rows.append({
                            "engine": engine_name, "catalogue": n_items, "history": h, "prompt_tokens": int(np.mean([len(g.tokens) for g in batch])),
                            "root_codes": len(trie.children[()]), "users": len(batch), "seconds": round(seconds, 2),
                            "users_per_s": round(len(batch) / seconds, 2), "ms_per_user_batched": round(1000 * seconds / len(batch), 1),
                            "ms_single_user_median": round(1000 * float(np.median(latencies)), 1),
                            "candidates_per_user": round(np.mean([len(q) for g in found for q in g]), 1),
                        })
                        print(rows[-1], flush=True)
                finally:
                    engine.close()
    write_results("retrieve", rows, notes=f"{args.preset} preset, semantic ids 3 x 64 codes + tie-break, beam {args.beam} / top {args.top}, "
                  "one condition per user; vLLM float32 with prefix caching bound to both cores, torch engine 2 threads")


if __name__ == "__main__":
    main()
