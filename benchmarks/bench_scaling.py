"""Cost curves of the embedding job (#8): time and memory against history length, conditions K, model preset
and number of users, each with the growth it shows.

    python -m benchmarks.bench_scaling                 # history 50..1000, K 1..16, tiny/small/base, 1k..100k users
    python -m benchmarks.bench_scaling --quick         # fewer points (history 50..500, K 1, 4, 16), 1k..5k users;
                                                       # the preset curve on the torch engine (one vLLM start-up)
    python -m benchmarks.bench_scaling --full          # users up to 1M (the simulator's `large` preset, streamed)

History, K and preset curves query the engines directly (vLLM, the production path, and the torch group-query
engine) with synthetic histories of exactly the asked length: the cost of a forward pass does not depend on
which items a history holds, only on how many tokens. Each point is the median of `--repeats` cold-cache runs
after a warm-up pass; models are random-initialised at each preset's shape (one pretraining step, so the folder
is a real `lum pretrain` output). The users curve runs whole `lum embed` jobs (torch engine, tiny model, 4
conditions, snapshot mode) in fresh processes on simulated worlds of that many users, timing the job and reading
its peak RSS. Growth: the exponent b of a least-squares fit time ~ a * x^b over the points (b ~ 1: linear,
b < 0.9: sub-linear, b > 1.1: super-linear).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import REPO_ROOT, RESULTS_DIR, write_results

CONDITION_COLUMNS = ("surface", "device", "daypart")


def growth(xs: list[float], ys: list[float]) -> dict[str, object]:
    """Exponent b of y ~ a * x^b (least squares in log-log) and a word for it."""
    b = float(np.polyfit(np.log(xs), np.log(ys), 1)[0])
    word = "flat" if abs(b) < 0.1 else "sub-linear" if b < 0.9 else "linear" if b <= 1.1 else "super-linear"
    return {"exponent": round(b, 2), "growth": word}


def plot_curves(rows: list[dict], path: Path) -> Path:
    """One log-log panel per curve: seconds against the curve's variable, a line per engine (and peak RSS for users)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("history", "history", "behaviours in the history"), ("K", "K", "query conditions K"),
              ("preset", "params", "model parameters"), ("users (lum embed job)", "users", "users"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (curve, variable, label) in zip(axes, panels):
        sel = [r for r in rows if r["curve"] == curve and "seconds" in r]
        for engine in sorted({r["engine"] for r in sel}):
            pts = sorted((r[variable], r["seconds"]) for r in sel if r["engine"] == engine)
            ax.plot(*zip(*pts), marker="o", label=engine)
        if curve.startswith("users") and sel:
            twin = ax.twinx()
            twin.plot(*zip(*sorted((r["users"], r["peak_rss_mib"]) for r in sel)), "k--", marker="s", label="peak RSS")
            twin.set_ylabel("peak RSS (MiB)")
            twin.set_ylim(bottom=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds")
        ax.set_title(curve)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def random_model(out: Path, preset: str, frame: pd.DataFrame, items: pd.DataFrame, max_history: int = 1000,
                 history_events: str = "all") -> Path:
    from lum.pretrain import PretrainConfig, pretrain
    from lum.tokenizer import TokenizerConfig

    pretrain(frame, out, PretrainConfig(preset=preset, max_steps=1, rows_per_batch=2, row_tokens=2048),
             TokenizerConfig(CONDITION_COLUMNS, max_history=max_history, history_events=history_events), items, progress=False)
    return out


def synthetic_groups(tokenizer, users: int, behaviours: int, k: int, seed: int = 0) -> list:
    """`users` snapshot query groups, each a history of exactly `behaviours` behaviours and K conditions,
    filled to whole cache blocks as the job does."""
    from lum.embed import QueryGroup
    from lum.tokenizer import BOS

    rng = np.random.default_rng(seed)
    conditions = np.array([tokenizer.token_to_id[t] for t in tokenizer.condition_tokens])
    item_ids = tokenizer.item_side_ids()
    if k > len(conditions):
        raise ValueError(f"the model knows {len(conditions)} condition tokens, fewer than K={k}")
    align = tokenizer.config.prompt_align
    groups = []
    for u in range(users):
        body = np.stack([rng.choice(conditions, behaviours), rng.choice(item_ids, behaviours)], axis=1).ravel()
        fill = -(1 + len(body)) % align
        tokens = np.concatenate([np.full(1 + fill, BOS), body]).astype(np.int64)
        asked = rng.choice(conditions, k, replace=False)
        groups.append(QueryGroup(user_id=f"u{u}", tokens=tokens, prefix_lengths=np.full(k, len(tokens)), conditions=asked,
                                 keys=[(0, str(c)) for c in asked]))
    return groups


def time_engine(engine, groups: list, repeats: int) -> tuple[float, str]:
    times = []
    for _ in range(repeats):
        if hasattr(engine, "llm"):
            engine.llm.reset_prefix_cache()
        started = time.perf_counter()
        engine.embed(groups)
        times.append(time.perf_counter() - started)
    return float(np.median(times)), f"{min(times):.2f}-{max(times):.2f}"


def shards_for(n_users: int) -> int:
    """One shard per 50k users: every shard streams the whole event file once, so shards are sized by memory."""
    return max(1, n_users // 50_000)


def job_in_fresh_process(model_dir: Path, n_users: int, tmp: Path) -> tuple[float, float, int]:
    """(job seconds, peak RSS MiB, users embedded) of a whole `lum embed` snapshot job on a world of n_users."""
    from pipelines.data.sources.simulator import preset, simulate_to_run
    from pipelines.paths import RunPaths

    world = "large" if n_users > 100_000 else "default"
    paths = RunPaths(tmp / f"world-{n_users}")
    simulate_to_run(preset(world, n_users=n_users, chunk_users=min(n_users, 25_000)), paths, progress=False)
    code = (
        "import json, time\n"
        "from benchmarks.common import peak_rss_mib\n"
        "from lum.embed_job import AsOf, EmbeddingJob, EmbedJobConfig\n"
        f"job = EmbeddingJob({str(model_dir)!r}, {str(paths.events)!r}, AsOf.parse('2025-02-20'), {str(tmp / f'out-{n_users}')!r}, "
        f"EmbedJobConfig(conditions='surface=home,surface=search,surface=item_detail,surface=cart', engine='torch', shards={shards_for(n_users)}))\n"
        "started = time.perf_counter()\n"
        "manifest = job.run(progress=False)\n"
        "print(json.dumps([time.perf_counter() - started, peak_rss_mib(), manifest['totals']['rows']]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the {n_users}-user job failed:\n{done.stderr[-3000:]}")
    seconds, rss, rows = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, rss, rows


def engine_curves(args, frame: pd.DataFrame, item_frame: pd.DataFrame, histories: list[int], ks: list[int], presets: list[str],
                  repeats: int) -> list[dict]:
    """The preset, history and K curves: both engines on synthetic histories of exact length."""
    from lum.embed import TorchEngine, VllmEngine, VllmSettings, resolve_vllm_dtype
    from lum.model import count_parameters, load_model
    from lum.tokenizer import BehaviourTokenizer

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for preset_name in presets:
            model_dir = random_model(tmp / preset_name, preset_name, frame, item_frame)
            tokenizer = BehaviourTokenizer.load(model_dir)
            params = count_parameters(load_model(model_dir).model)
            engines = []
            if preset_name == "small" or not args.quick:  # quick mode: one vLLM start-up (about 40 s here), on small
                engines.append(("vllm", lambda: VllmEngine(str(model_dir), max_model_len=2048, settings=VllmSettings())))
            if preset_name == "small" or args.quick:  # quick mode: the preset curve on the torch engine
                engines.append(("torch", lambda: TorchEngine(str(model_dir))))
            for engine_name, build in engines:
                engine = build()
                try:
                    engine.embed(synthetic_groups(tokenizer, args.users, 100, 4, seed=1))  # warm-up
                    points = [("preset", preset_name, 100, 4)]
                    if preset_name == "small":  # the history and K curves on the small preset
                        points += [("history", preset_name, h, 4) for h in histories if h != 100]
                        points += [("K", preset_name, 100, k) for k in ks if k != 4]
                    for curve, p, behaviours, k in points:
                        groups = synthetic_groups(tokenizer, args.users, behaviours, k)
                        seconds, spread = time_engine(engine, groups, repeats)
                        label = f"{engine_name} ({resolve_vllm_dtype('auto')})" if engine_name == "vllm" else "torch (float32)"
                        rows.append({"curve": curve, "engine": label, "preset": p, "params": params, "history": behaviours, "K": k, "users": args.users,
                                     "seconds": round(seconds, 2), "seconds_min_max": spread,
                                     "users_per_s": round(args.users / seconds, 1),
                                     "history_tokens_per_s": round(args.users * (1 + 2 * behaviours) / seconds)})
                        print(rows[-1], flush=True)
                finally:
                    engine.close()
    # the preset/history/K rows at (small, 100, 4) are shared by all three curves
    for r in [r for r in rows if r["curve"] == "preset" and r["preset"] == "small"]:
        for curve in ("history", "K"):
            rows.append({**r, "curve": curve})
    return rows


def users_curve(tmp: Path, frame: pd.DataFrame, item_frame: pd.DataFrame, job_users: list[int]) -> list[dict]:
    """Whole `lum embed` jobs on worlds of each size: a tiny model over clicks with the job's default history (100
    behaviours), as production would run it (the engine curves use histories of every impression at exact lengths)."""
    tiny_dir = random_model(tmp / "tiny-job", "tiny", frame, item_frame, max_history=100, history_events="positive")
    rows = []
    for n in job_users:
        seconds, rss, written = job_in_fresh_process(tiny_dir, n, tmp)
        rows.append({"curve": "users (lum embed job)", "engine": "torch (float32)", "preset": "tiny", "history": 100, "K": 4,
                     "users": n, "shards": shards_for(n), "seconds": round(seconds, 1), "users_per_s": round(n / seconds, 1),
                     "peak_rss_mib": round(rss), "rows_written": written})
        print(rows[-1], flush=True)
        shutil.rmtree(tmp / f"world-{n}", ignore_errors=True)  # the 1M-user world is several GB
        shutil.rmtree(tmp / f"out-{n}", ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--full", action="store_true")
    parser.add_argument("--users", type=int, default=200, help="users per engine measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--users-only", metavar="N[,N]", help="re-measure only the users curve at these sizes and replace it "
                        "in the existing scaling.json (the other curves' rows are kept as they are)")
    args = parser.parse_args()
    histories = [50, 200, 500] if args.quick else [50, 100, 200, 500, 1000]
    ks = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16]
    presets = ["tiny", "small"] if args.quick else ["tiny", "small", "base"]
    job_users = [1000, 5000] if args.quick else [1000, 10_000, 100_000] + ([1_000_000] if args.full else [])
    repeats = 1 if args.quick else args.repeats

    from pipelines.data.sources.simulator import preset, simulate

    events, items = simulate(preset("default", n_users=3000, chunk_users=3000))
    frame, item_frame = events.to_pandas(), items.to_pandas()
    if args.users_only:
        job_users = [int(n) for n in args.users_only.split(",")]
        previous = json.loads((RESULTS_DIR / "scaling.json").read_text())
        kept_from = f"; users curve re-measured alone (--users-only), the other curves kept from the run of {previous['machine']['date']}"
        rows = [r for r in previous["rows"] if r["curve"] != "users (lum embed job)" and not r["curve"].startswith("growth: ")]
    else:
        kept_from = ""
        rows = engine_curves(args, frame, item_frame, histories, ks, presets, repeats)
    with tempfile.TemporaryDirectory() as tmp_name:
        rows += users_curve(Path(tmp_name), frame, item_frame, job_users)

    # growth of each curve (time against its variable, per engine)
    fits = []
    for curve, variable in (("history", "history"), ("K", "K"), ("preset", "params"), ("users (lum embed job)", "users")):
        for engine in sorted({r["engine"] for r in rows if r["curve"] == curve}):
            sel = sorted((r for r in rows if r["curve"] == curve and r["engine"] == engine), key=lambda r: r[variable])
            if len(sel) >= 2:
                fit = growth([r[variable] for r in sel], [r["seconds"] for r in sel])
                fits.append({"curve": curve, "engine": engine, "time vs": variable, **fit})
                if curve.startswith("users"):
                    fits.append({"curve": curve, "engine": engine, "time vs": "users (peak RSS)",
                                 **growth([r["users"] for r in sel], [r["peak_rss_mib"] for r in sel])})
    for fit in fits:
        rows.append({"curve": f"growth: {fit['curve']}", "engine": fit["engine"],
                     "fit": f"time ~ x^{fit['exponent']}" if "RSS" not in fit["time vs"] else f"RSS ~ x^{fit['exponent']}",
                     "variable": fit["time vs"], "growth": fit["growth"]})
    print(f"plot: {plot_curves(rows, RESULTS_DIR / 'scaling.png')}")
    write_results("scaling", rows, notes="synthetic histories of exact length on random-initialised models (speed does not depend on the weights); "
                  "vLLM with its default settings (block-filled prompts, prefix caching, both cores); users curve: whole lum embed jobs, "
                  "one shard per 50k users" + kept_from)


if __name__ == "__main__":
    main()
