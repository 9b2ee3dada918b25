"""Rolling-mode embedding (one query set per request row): vLLM against the torch group-query engine.

    python -m benchmarks.bench_rolling                  # 2,000 users of the demo's world, tiny LM, K = 5
    python -m benchmarks.bench_rolling --users 500 --repeats 1

The demo's embedding step is rolling: every request row of the ranker windows gets its own vectors, from the
history strictly before it, under the request's own condition and each surface (K = 5). Rows of one user share
history windows (`window_stride` 16), so a group holds many rows' queries on one history. vLLM shares a history
through its prefix cache, in whole 32-token blocks; a rolling prompt ends anywhere inside a block, so every query
recomputes the tail of its last block. The torch engine computes a group's history once and all its queries in
the same forward pass. This benchmark times both on the same groups (the job's own `build_queries`, as the
rolling job calls it), after one warm-up pass, vLLM's prefix cache reset before every measurement, the median of
`--repeats`. Queries/s counts (row, condition) pairs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_results

CONDITIONS = ["request", "surface=home", "surface=search", "surface=item_detail", "surface=cart"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from lum.embed import TorchEngine, VllmEngine, VllmSettings, build_queries, resolve_conditions, resolve_vllm_dtype
    from lum.embed_job import EmbedJobConfig
    from lum.pretrain import PretrainConfig, pretrain
    from lum.tokenizer import BehaviourTokenizer, TokenizerConfig
    from pipelines.data.sources.simulator import preset, simulate

    events, items = simulate(preset("default", n_users=args.users, chunk_users=args.users))
    frame = events.to_pandas()
    cut = frame.ts.quantile(0.6)  # as the demo: histories from everything before, rows of the last 40% of the window
    rows_frame = frame[frame.ts >= cut].drop_duplicates(["user_id", "ts"])[["user_id", "ts", "surface", "device", "daypart"]]
    rows_frame = rows_frame.assign(key=np.arange(len(rows_frame)))
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        model_dir = Path(tmp_name) / "model"
        pretrain(frame[frame.ts < cut], model_dir, PretrainConfig(preset=args.preset, max_steps=5, rows_per_batch=8, row_tokens=512),
                 TokenizerConfig(("surface", "device", "daypart"), max_history=100, min_item_count=5), items.to_pandas(), progress=False)
        tokenizer = BehaviourTokenizer.load(model_dir)
        conditions = resolve_conditions(tokenizer, CONDITIONS)
        groups, skipped = build_queries(tokenizer, frame, rows_frame, conditions, 100, EmbedJobConfig.window_stride, align=1)
        queries = sum(g.n_queries for g in groups)
        history_tokens = sum(len(g.tokens) for g in groups)
        prompt_tokens = sum(len(p) for g in groups for p in g.prompts())
        print(f"{len(rows_frame):,} request rows ({skipped:,} without history), {len(groups):,} groups, {queries:,} queries, "
              f"{history_tokens:,} history tokens, {prompt_tokens:,} prompt tokens", flush=True)

        def vllm():
            engine = VllmEngine(str(model_dir), max_model_len=2048, settings=VllmSettings())
            def run() -> None:
                engine.llm.reset_prefix_cache()
                engine.embed(groups)
            return run, engine.close

        def torch_engine():
            engine = TorchEngine(str(model_dir))
            return (lambda: engine.embed(groups)), engine.close

        for name, build in ((f"vllm ({resolve_vllm_dtype('auto')})", vllm), ("torch group query (float32)", torch_engine)):
            run, close = build()
            try:
                run()  # warm-up
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - started)
            finally:
                close()
            seconds = float(np.median(times))
            results.append({"engine": name, "preset": args.preset, "users": args.users, "rows": len(rows_frame) - skipped, "K": len(CONDITIONS),
                            "groups": len(groups), "queries": queries, "history_tokens": history_tokens, "prompt_tokens": prompt_tokens,
                            "seconds": round(seconds, 2), "seconds_min_max": f"{min(times):.2f}-{max(times):.2f}",
                            "queries_per_s": round(queries / seconds)})
            print(results[-1], flush=True)
    fastest = min(r["seconds"] for r in results)
    for r in results:
        r["time_vs_fastest"] = round(r["seconds"] / fastest, 2)
    write_results("rolling", results, notes=f"rolling rows of {args.users:,} simulated users (the demo's world and conditions), {args.preset} LM; "
                  f"median of {args.repeats} after a warm-up; vLLM prefix caching on (block 32), both cores; torch engine 2 threads")


if __name__ == "__main__":
    main()
