"""Embedding-job throughput: vLLM vs the torch group-query engine vs a naive transformers baseline, K conditions.

    python -m benchmarks.bench_embed                    # small preset, 500 users, K = 1, 2, 4, 8; RSS at 1k, 10k users
    python -m benchmarks.bench_embed --full             # RSS also at 100k users
    python -m benchmarks.bench_embed --quick            # `make bench` quick mode: K = 1, 4; no bfloat16 naive baseline,
                                                        # no RSS jobs (bench_scaling's users curve measures those)

Tokens/s counts the tokens of every prompt (history + condition) as a user would submit them, so sharing a
history across K conditions shows up as a higher rate. The vLLM and torch engines get the snapshot job's prompts,
left-filled with [BOS] to whole 32-token prefix-cache blocks; those fill tokens are not counted. Each cell is the
median of `--repeats` cold-cache measurements after one full warm-up pass. The naive baseline pads batches of 32 prompts and runs one
forward per (user, condition) prompt. The model is a `small` LM trained for a few steps (speed does not depend
on how well it is trained). Engine start-up is not timed. Peak RSS is measured for whole `lum embed` runs
(torch engine) in fresh processes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.common import REPO_ROOT, write_results

KS = (1, 2, 4, 8)


def naive_embed(model, prompts: list[np.ndarray], batch: int = 32) -> int:
    """One padded forward per batch of prompts, no sharing; returns the number of prompts."""
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            width = max(len(p) for p in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, : len(p)] = torch.as_tensor(p)
                mask[r, : len(p)] = 1
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            hidden[torch.arange(len(chunk)), mask.sum(1) - 1].float().numpy()
    return len(prompts)


def peak_rss_of_job(model_dir: Path, users: int, tmp: Path) -> tuple[float, float]:
    from pipelines.data.sources.simulator import preset, simulate_to_run
    from pipelines.paths import RunPaths

    paths = RunPaths(tmp / f"rss-{users}")
    simulate_to_run(preset("default", n_users=users, chunk_users=min(users, 25_000)), paths, progress=False)
    code = (
        "from benchmarks.common import peak_rss_mib\n"
        "from lum.embed_job import AsOf, EmbeddingJob, EmbedJobConfig\n"
        f"job = EmbeddingJob({str(model_dir)!r}, {str(paths.events)!r}, AsOf.parse('2025-02-20'), {str(tmp / f'out-{users}')!r}, "
        "EmbedJobConfig(conditions='surface=home,surface=search,surface=item_detail,surface=cart', engine='torch', shards=max(1, %d // 2500)))\n"
        "job.run(progress=False)\n"
        "print(peak_rss_mib())\n"
    ) % users
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    return float(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--preset", default="small")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true")
    size.add_argument("--quick", action="store_true", help="K = 1 and 4 only, no bfloat16 naive baseline (slow on CPU) and no "
                      "RSS jobs (bench_scaling's users curve runs the same jobs)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell; the table shows the median")
    parser.add_argument("--naive-repeats", type=int, default=1, help="the naive baseline is slow and steady (spread < 5%% here)")
    args = parser.parse_args()
    ks = (1, 4) if args.quick else KS

    from lum.embed import TorchEngine, VllmEngine, VllmSettings, build_queries, resolve_conditions, resolve_vllm_dtype
    from lum.model import load_model
    from lum.pretrain import PretrainConfig, pretrain
    from lum.tokenizer import BehaviourTokenizer, TokenizerConfig
    from pipelines.data.sources.simulator import preset, simulate

    events, items = simulate(preset("default", n_users=5000, chunk_users=5000))
    frame = events.to_pandas()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "model"
        pretrain(frame, model_dir, PretrainConfig(preset=args.preset, max_steps=5, rows_per_batch=8, row_tokens=512),
                 TokenizerConfig(("surface", "device", "daypart"), max_history=100, history_events="all"), items.to_pandas(), progress=False)
        tokenizer = BehaviourTokenizer.load(model_dir)
        as_of = pd.Timestamp("2025-02-20", tz="UTC")
        users = frame.user_id.drop_duplicates().iloc[: args.users]
        queries = pd.DataFrame({"user_id": users, "ts": as_of, "key": as_of})
        all_conditions = resolve_conditions(tokenizer, "all")
        align = tokenizer.config.prompt_align
        # what a user asks: plain prompts (the naive baseline runs these); our engines get the snapshot job's
        # prompts, filled with [BOS] to whole prefix-cache blocks. Tokens/s counts the plain tokens for all.
        plain = {k: build_queries(tokenizer, frame, queries, all_conditions[:k], 100, 16)[0] for k in ks}
        filled = {k: build_queries(tokenizer, frame, queries, all_conditions[:k], 100, 16, align)[0] for k in ks}

        def vllm(dtype: str):
            engine = VllmEngine(str(model_dir), max_model_len=2048, settings=VllmSettings(dtype=dtype))
            def run(k: int) -> None:
                engine.llm.reset_prefix_cache()  # every measurement starts cold: no history cached by the last one
                engine.embed(filled[k])
            return run, engine.close

        def torch_engine():
            engine = TorchEngine(str(model_dir))
            return (lambda k: engine.embed(filled[k])), engine.close

        def naive(dtype: torch.dtype):
            model = load_model(model_dir).model.to(dtype)
            return (lambda k: naive_embed(model, [p for g in plain[k] for p in g.prompts()])), (lambda: None)

        default_dtype = resolve_vllm_dtype("auto")
        engines = [
            (f"vllm ({default_dtype}, default)", lambda: vllm("auto"), args.repeats),
            # on a CPU without bfloat16 support the default already is float32: measuring it twice adds nothing
            *([("vllm (float32)", lambda: vllm("float32"), args.repeats)] if default_dtype != "float32" else []),
            ("torch group query (float32)", torch_engine, args.repeats),
            ("naive (float32)", lambda: naive(torch.float32), args.naive_repeats),
            *([] if args.quick else [("naive (bfloat16)", lambda: naive(torch.bfloat16), args.naive_repeats)]),
        ]
        for name, build, repeats in engines:
            run, close = build()
            try:
                run(ks[0])  # one full warm-up pass
                for k in ks:
                    times = []
                    for _ in range(repeats):
                        started = time.perf_counter()
                        run(k)
                        times.append(time.perf_counter() - started)
                    seconds = float(np.median(times))
                    tokens = sum(len(p) for g in plain[k] for p in g.prompts())
                    fill = 0 if name.startswith("naive") else sum(len(g.tokens) for g in filled[k]) - sum(len(g.tokens) for g in plain[k])
                    rows.append({"engine": name, "K": k, "users": len(plain[k]), "prompts": sum(g.n_queries for g in plain[k]),
                                 "prompt_tokens": tokens, "fill_tokens": fill, "seconds": round(seconds, 2),
                                 "seconds_min_max": f"{min(times):.2f}-{max(times):.2f}", "tokens_per_s": round(tokens / seconds),
                                 "users_per_s": round(len(plain[k]) / seconds, 1)})
                    print(rows[-1], flush=True)
            finally:
                close()
        for r in rows:
            base = next(x for x in rows if x["engine"] == r["engine"] and x["K"] == 1)
            r["time_vs_K1"] = round(r["seconds"] / base["seconds"], 2)
            for dtype in ("float32", "bfloat16"):
                naive_row = next((x for x in rows if x["engine"] == f"naive ({dtype})" and x["K"] == r["K"]), None)
                if naive_row is not None:  # quick mode has no bfloat16 baseline
                    r[f"speed_vs_naive_{dtype}"] = round(r["tokens_per_s"] / naive_row["tokens_per_s"], 2)
        # memory against users: the job's streaming matters here, not the model, so a tiny model keeps it quick.
        # Quick mode leaves it to bench_scaling's users curve, which runs the same jobs.
        rss_users = () if args.quick else (1000, 10_000, *((100_000,) if args.full else ()))
        if rss_users:
            tiny_dir = tmp / "tiny"
            pretrain(frame, tiny_dir, PretrainConfig(preset="tiny", max_steps=5, rows_per_batch=8, row_tokens=512),
                     TokenizerConfig(("surface", "device", "daypart"), max_history=100), items.to_pandas(), progress=False)
        for n in rss_users:
            rss, seconds = peak_rss_of_job(tiny_dir, n, tmp)
            rows.append({"engine": "torch job (lum embed), tiny", "K": 4, "users": n, "seconds": round(seconds, 1), "peak_rss_mib": round(rss)})
            print(rows[-1], flush=True)
    write_results("embed", rows, notes=f"{args.preset} preset, simulator default world, histories of up to 100 behaviours "
                  "(every impression is a behaviour here; prompts average about 120 tokens); "
                  f"median of {args.repeats} runs per cell ({args.naive_repeats} for naive); "
                  "vLLM with prefix caching (block 32) bound to both cores; torch engine with 2 threads")


if __name__ == "__main__":
    main()
