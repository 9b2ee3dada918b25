"""Quality curves (#8): the ranker's +LUM lift against the LM preset and against the history length it is queried with.

    make demo && python -m benchmarks.bench_quality --run runs/demo
    lum run --config configs/movielens.yaml && python -m benchmarks.bench_quality --run runs/movielens
    python -m benchmarks.bench_quality --run runs/demo --presets tiny,small --histories 5,20,100 --users 3000

Needs a finished run folder (its split, training sets and LM): the curves re-use the run's own training-set tables
and change only the LUM columns in them. For every LM preset asked, an LM is pretrained on the run's pretraining
window with the run's LM settings (the run's own model is re-used for its preset; `--epochs P=N` overrides the
epochs of a preset, since a bigger preset costs more per token on 2 cores). For every history length, the LUM
columns of a sample of users' training and test rows are recomputed from that LM, each row's query seeing only its
user's last H behaviours strictly before the row (the torch group-query engine, which the tests keep equal to
vLLM), under the run's query conditions. Then LightGBM (`ranker.train`, the run's ranker options) is trained on
the sampled training rows as base and as +LUM and scored on the sampled test rows; the lift is the GAUC of +LUM
minus base with a 95% interval from a paired bootstrap over users. Base does not change along a curve, so every
point of a curve is compared with the same base scores.

Writes benchmarks/results/quality-<run name>.json and quality-<run name>.png.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import RESULTS_DIR, write_results
from contracts.names import LUM_ITEM_COLUMN, LUM_USER_PREFIX, TRAINING_SET_METADATA_KEY


def sample_users(table: pa.Table, users: int, seed: int) -> np.ndarray:
    """`users` user ids of the test table, drawn without replacement (all of them when there are fewer)."""
    ids = np.unique(table.column("user_id").to_numpy(zero_copy_only=False).astype(str))
    if users >= len(ids):
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, users, replace=False))


def rows_of(table: pa.Table, users: np.ndarray) -> pa.Table:
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table.column("user_id").cast(pa.string()), pa.array(users)))


def lum_columns(model_dir: Path, table: pa.Table, events: pd.DataFrame, schema, history: int) -> pa.Table:
    """`table` with its lum_user__* and lum_item columns recomputed from the LM in `model_dir`.

    Each row's queries see the user's last `history` behaviours strictly before the row's time; a row without any
    earlier behaviour gets null user vectors (as the feature store gives it).
    """
    from lum.embed import REQUEST, TorchEngine, build_queries, resolve_conditions
    from lum.embed_job import EmbedJobConfig
    from lum.tokenizer import BehaviourTokenizer

    tokenizer = BehaviourTokenizer.load(model_dir)
    engine = TorchEngine(str(model_dir))
    head = engine.model.lm_head.weight.detach().float().numpy()
    names = list(schema.lum_conditions)  # column suffixes, in the table's order
    conditions = resolve_conditions(tokenizer, [schema.lum_conditions[s] for s in names])
    frame = table.select(["user_id", "ts", *[c for c in tokenizer.config.condition_columns if c in table.column_names]]).to_pandas()
    frame["user_id"] = frame["user_id"].astype(str)
    frame["key"] = np.arange(len(frame))
    if any(name == REQUEST for name, _ in conditions):
        as_of = frame
    else:
        as_of = frame[["user_id", "ts", "key"]]
    # as the embedding job's rolling mode: one group per history window, no prompt fill
    groups, _ = build_queries(tokenizer, events, as_of, conditions, max_history=history, window_stride=EmbedJobConfig.window_stride, align=1)
    vectors = engine.embed(groups)
    dim = head.shape[1]
    users = np.full((len(names), len(frame), dim), np.nan, dtype=np.float32)
    which = {schema.lum_conditions[s]: k for k, s in enumerate(names)}
    for group, matrix in zip(groups, vectors):
        for (key, condition), vector in zip(group.keys, matrix):
            users[which[condition], key] = vector
    item_tokens = tokenizer.item_ids(table.column("item_id").to_pandas().astype(str))[:, 0]
    out = table
    for k, s in enumerate(names):
        column = LUM_USER_PREFIX + s
        values = pa.array([None if np.isnan(v).any() else v for v in users[k]], pa.list_(pa.float32()))
        out = out.set_column(out.schema.get_field_index(column), column, values)
    out = out.set_column(out.schema.get_field_index(LUM_ITEM_COLUMN), LUM_ITEM_COLUMN, pa.array(list(head[item_tokens]), pa.list_(pa.float32())))
    key = TRAINING_SET_METADATA_KEY.encode()
    meta = json.loads(out.schema.metadata[key])
    meta["lum_dim"] = dim
    return out.replace_schema_metadata({**out.schema.metadata, key: json.dumps(meta).encode()})


def train_and_score(train: pa.Table, test: pa.Table, variant: str, rankers: Any) -> np.ndarray:
    """LightGBM of `variant` with the run's ranker settings (its `rankers:` section): [N] test scores."""
    from ranker.train import train_ranker

    return np.asarray(train_ranker(train, rankers.ranker_config("lightgbm", variant)).score(test), dtype=np.float64)


def logged_pretrain_seconds(model_dir: Path) -> float | None:
    """The pretraining wall time a model folder's training log recorded (its last entry is cumulative)."""
    log = model_dir / "training_log.json"
    entries = json.loads(log.read_text()) if log.exists() else []
    return entries[-1].get("seconds") if entries else None


def pretrain_preset(run: Path, preset: str, epochs: int) -> tuple[Path, float | None]:
    """An LM of `preset` on the run's pretraining window with the run's LM settings: (folder, pretraining seconds).

    The run's own model serves its preset at the run's epochs; other LMs go to <run>/quality_models/ and are
    re-used by a later call with the same preset and epochs. A model not trained by this call reports the
    seconds its own training log recorded (None if it has none).
    """
    from pipelines.paths import RunPaths
    from pipelines.run.config import parse_run_config
    from pipelines.steps.lm import check_model_matches, pretrain_step, resolve_tokenizer

    config = parse_run_config(json.loads((run / "run_state.json").read_text())["config"], str(run / "run_state.json"))
    lm, protocol = config.lm, config.protocols[0].split
    paths = RunPaths(run)
    if preset == lm.pretrain.preset and epochs == lm.pretrain.epochs:
        return paths.model_dir(protocol, preset), logged_pretrain_seconds(paths.model_dir(protocol, preset))
    # the run's own LM settings, but for the preset and epochs of this point
    pretrain_config = replace(lm.pretrain, preset=preset, epochs=epochs)
    out = run / "quality_models" / f"{protocol}-{preset}-{epochs}ep"
    if out.exists():
        try:
            check_model_matches(out, pretrain_config, resolve_tokenizer(paths, protocol, lm.tokenizer))
            return out, logged_pretrain_seconds(out)
        except ValueError:
            pass  # made with other LM settings than the run's: pretrained again below
    started = time.perf_counter()
    pretrain_step(paths, protocol, pretrain_config, lm.tokenizer, force=True, out_dir=out)
    return out, time.perf_counter() - started


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (curve, variable, label) in zip(axes, (("preset", "params", "LM parameters"), ("history", "history", "behaviours the query sees"))):
        sel = sorted((r for r in rows if r["curve"] == curve), key=lambda r: r[variable])
        if sel:
            x = [r[variable] for r in sel]
            y = [r["gauc_lift"] for r in sel]
            err = [[r["gauc_lift"] - r["low"] for r in sel], [r["high"] - r["gauc_lift"] for r in sel]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
            for r in sel:
                ax.annotate(r["preset"] if curve == "preset" else str(r["history"]), (r[variable], r["gauc_lift"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("GAUC lift, +LUM vs base (LightGBM)")
        ax.set_title(f"lift against {curve}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder (lum run / make demo)")
    parser.add_argument("--presets", default="tiny,small", help="LM presets of the preset curve")
    parser.add_argument("--epochs", default="", help="per-preset epochs, e.g. small=3 (default: the run's)")
    parser.add_argument("--histories", default="5,20,100", help="history lengths of the history curve (run's preset)")
    parser.add_argument("--users", type=int, default=3000, help="users sampled (their training and test rows)")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from lum.model import count_parameters, load_model
    from pipelines.data.contract import read_events
    from pipelines.paths import RunPaths
    from ranker.metrics import gauc, paired_bootstrap
    from ranker.schema import FeatureSchema

    run = args.run
    if not (run / "run_state.json").exists():
        raise SystemExit(f"{run} is not a run folder (no run_state.json): run `make demo` or `lum run --config ...` first")
    from pipelines.run.config import parse_run_config

    state = parse_run_config(json.loads((run / "run_state.json").read_text())["config"], str(run / "run_state.json"))
    protocol, run_preset, run_epochs = state.protocols[0].split, state.lm.pretrain.preset, state.lm.pretrain.epochs
    max_history = state.lm.tokenizer.max_history
    paths = RunPaths(run)
    sets = sorted((run / "training_sets").glob(f"{protocol}-train-*.parquet"))
    if not sets:
        raise SystemExit(f"{run}/training_sets has no {protocol}-train-*.parquet: finish the run first")
    train_full = pq.read_table(sets[0])
    test_full = pq.read_table(str(sets[0]).replace("-train-", "-test-"))
    users = sample_users(test_full, args.users, args.seed)
    train, test = rows_of(train_full, users), rows_of(test_full, users)
    schema = FeatureSchema.from_table(train)
    events = pd.concat([read_events(paths.split_file(protocol, w))[0].to_pandas() for w in ("pretrain", "train", "test")], ignore_index=True)
    events = events[events["user_id"].astype(str).isin(set(users))]
    options = state.rankers
    epochs = {k: int(v) for k, v in (p.split("=") for p in args.epochs.split(",") if p)}
    presets = [p for p in args.presets.split(",") if p]
    histories = sorted({int(h) for h in args.histories.split(",") if h})
    print(f"{run}: {len(users):,} users, {train.num_rows:,} training rows, {test.num_rows:,} test rows", flush=True)

    frame = test.select(["user_id", "label"]).to_pandas()
    frame["user_id"] = frame["user_id"].astype(str)
    frame["base"] = train_and_score(train, test, "base", options)
    base_gauc = gauc(frame["label"].to_numpy(), frame["base"].to_numpy(), frame["user_id"].to_numpy()).value

    rows: list[dict] = []
    points = [("preset", p, max_history) for p in presets] + [("history", run_preset, h) for h in histories]
    models: dict[str, tuple[Path, float | None]] = {}
    measured: dict[tuple[str, int], dict] = {}  # (preset, history) -> its row: the curves share their crossing point
    for curve, preset, history in points:
        if (preset, history) not in measured:
            if preset not in models:
                models[preset] = pretrain_preset(run, preset, epochs.get(preset, run_epochs))
            model_dir, pretrain_s = models[preset]
            started = time.perf_counter()
            lum_train = lum_columns(model_dir, train, events, schema, history)
            lum_test = lum_columns(model_dir, test, events, schema, history)
            embed_s = time.perf_counter() - started
            frame["lum"] = train_and_score(lum_train, lum_test, "lum", options)
            boot = paired_bootstrap(frame, "base", "lum", "gauc", n=args.bootstrap, seed=args.seed)
            measured[(preset, history)] = {
                "run": run.name, "protocol": protocol, "preset": preset, "params": count_parameters(load_model(model_dir).model),
                "epochs": epochs.get(preset, run_epochs), "history": history, "users": len(users),
                "base_gauc": round(base_gauc, 4), "lum_gauc": round(base_gauc + boot.delta, 4),
                "gauc_lift": round(boot.delta, 4), "low": round(boot.low, 4), "high": round(boot.high, 4),
                "pretrain_s": None if pretrain_s is None else round(pretrain_s), "embed_s": round(embed_s)}
        rows.append({"curve": curve, **measured[(preset, history)]})
        print(rows[-1], flush=True)
    name = f"quality-{run.name}"
    print(f"plot: {plot(rows, Path(RESULTS_DIR) / f'{name}.png')}")
    write_results(name, rows, notes=f"LightGBM +LUM vs base on {len(users):,} sampled users of {run}; GAUC lift with a paired "
                  f"bootstrap over users ({args.bootstrap} resamples); the run's own LM for its preset, others pretrained here")


if __name__ == "__main__":
    main()
