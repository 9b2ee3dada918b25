"""Is our `din` a real DIN? Ours (ranker/din.py, TorchRec) against DeepCTR-Torch's DIN on the same rows and histories.

    python -m benchmarks.bench_din_reference --quick      # ml-latest-small (if ../shared/data has it) and a small simulator run
    python -m benchmarks.bench_din_reference              # ml-latest-small and the simulator's default world (2,000 users)

DeepCTR-Torch (an established library's DIN: its `AttentionSequencePoolingLayer` with Dice and the 64-16 attention
MLP) is installed into its own virtual environment (`build/din-reference-env`, made on first use from
`benchmarks/din_reference/requirements.txt` and the machine's torch file), never into the project's: this
process prepares the data and scores, a subprocess in that environment trains the reference.

The same inputs for both: each training-set row's sparse ids (user, item, item category, the request-context
columns, from our fitted vocabularies), the same standardised dense block (counters, flags, history length), and
the user's last `history_len` engaged items and their categories (ids in the same vocabularies). The same split:
the latest 10% of the training window by time picks each model's epoch on validation AUC; the test window is
scored once. Data: a global split of the simulator (the demo's world, fewer users) and the per-user split of
ml-latest-small, training sets built through our Feast repo (`ranker_pooled`: no LUM features, so no LM is needed).

Goal (issue 33): ours within 0.003 test AUC of the reference, or better. Writes benchmarks/results/din_reference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.common import write_results

ROOT = Path(__file__).resolve().parents[1]
ENV = ROOT / "build" / "din-reference-env"
REQUIREMENTS = ROOT / "benchmarks" / "din_reference" / "requirements.txt"
TRAINER = ROOT / "benchmarks" / "din_reference" / "train_reference.py"
SHARED_MOVIELENS = ROOT.parent / "shared" / "data" / "ml-latest-small"


def reference_python() -> Path:
    """The reference environment's interpreter, made on first use (about a minute: torch comes from the machine's file)."""
    python = ENV / "bin" / "python"
    stamp = ENV / ".installed"
    if not stamp.exists() or stamp.read_text() != REQUIREMENTS.read_text():
        subprocess.run([sys.executable, "-m", "venv", str(ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True)
        stamp.write_text(REQUIREMENTS.read_text())
    return python


def training_sets(name: str, work: Path, quick: bool) -> tuple[pa.Table, pa.Table]:
    """(train, test) training-set tables of one dataset, built through our Feast repo."""
    from pipelines.data.sources.simulator import preset, simulate_to_run
    from pipelines.data.split import SplitConfig, split_run
    from pipelines.paths import RunPaths
    from pipelines.steps.data import import_movielens
    from pipelines.steps.features import build_window_training_set, prepare_repo

    paths = RunPaths(work / name)
    if name == "simulator":
        simulate_to_run(preset("default", n_users=1000 if quick else 2000, chunk_users=2000), paths, progress=False)
        protocol = "global"
    else:
        import_movielens(paths, str(SHARED_MOVIELENS), like_threshold=4.0)
        protocol = "per-user"
    split_run(paths, SplitConfig(protocol))
    prepare_repo(paths)
    import pyarrow.parquet as pq

    return tuple(pq.read_table(build_window_training_set(paths, protocol, w, "ranker_pooled", progress=False)) for w in ("train", "test"))


def reference_arrays(pipeline, table: pa.Table) -> dict[str, np.ndarray]:
    """The reference's inputs of `table`'s rows from our fitted pipeline: sparse ids, dense block, padded histories."""
    from ranker.features import HISTORY_CATEGORIES, HISTORY_ITEMS

    inputs = pipeline.dlrm_inputs(table)
    out: dict[str, np.ndarray] = {"dense": inputs.dense.numpy()}
    if pipeline.schema.label in table.column_names:
        out["label"] = pc.cast(table.column(pipeline.schema.label), pa.float32()).to_numpy()
    for column in pipeline.schema.categorical_columns:  # shifted by one like the histories: one id space per table
        out[f"sparse__{column}"] = pipeline.vocabularies[column].ids(table.column(column)) + 1
    length = pipeline.config.history_len
    for column in (HISTORY_ITEMS, HISTORY_CATEGORIES):  # the pooled-history keys our pipeline made: the last history_len ids
        ids, offsets = inputs.ids[inputs.keys.index(column)], inputs.offsets[inputs.keys.index(column)]
        padded = np.zeros((table.num_rows, length), dtype=np.int64)  # 0 is padding (DeepCTR masks id 0)
        lengths = np.diff(offsets)
        rows = np.repeat(np.arange(table.num_rows), lengths)
        cols = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        padded[rows, cols] = ids + 1  # shifted: our OOV id 0 would read as padding
        out[f"hist__{column}"] = padded
    return out


def run_dataset(name: str, work: Path, python: Path, args: argparse.Namespace) -> list[dict]:
    from ranker.config import DLRMConfig, FeatureConfig, RankerConfig
    from ranker.features import FeaturePipeline
    from ranker.metrics import ranking_metrics
    from ranker.schema import FeatureSchema
    from ranker.train import time_split, train_ranker

    train, test = training_sets(name, work, args.quick)
    schema = FeatureSchema.from_table(train)
    features = FeatureConfig(history_len=args.history_len)
    dlrm = DLRMConfig(embedding_dim=args.dim, epochs=args.epochs, patience=1, batch_size=args.batch_size, seed=args.seed,
                      attention_softmax=False, threads=args.threads)
    rows = []
    test_frame = test.select(["user_id", "label"]).to_pandas()

    # our tables train with row-wise Adagrad (the reference: Adam on everything): its learning rate is chosen here on
    # the validation AUC (the latest 10% of the training window), never on the test window
    started = time.perf_counter()
    tried = {lr: train_ranker(train, RankerConfig(model="dlrm", variant="din", features=features, dlrm=replace(dlrm, embedding_lr=lr)))
             for lr in args.embedding_lrs}
    chosen = max(tried, key=lambda lr: tried[lr].training["valid_auc"])
    ours = tried[chosen]
    seconds = time.perf_counter() - started
    metrics = ranking_metrics(test_frame.assign(score=ours.score(test)))
    rows.append({"data": name, "model": "ours: ranker/din.py (TorchRec)", "train_rows": train.num_rows, "test_rows": test.num_rows,
                 "test_auc": round(metrics["auc"], 4), "test_gauc": round(metrics["gauc"], 4),
                 "best_epoch": ours.training["best_epoch"], "valid_auc": round(ours.training["valid_auc"], 4),
                 "setting": f"embedding_lr {chosen} (of {', '.join(map(str, tried))}: validation AUC "
                            + ", ".join(f"{t.training['valid_auc']:.4f}" for t in tried.values()) + ")",
                 "seconds": round(seconds, 1)})

    # the reference on the same rows: our pipeline fitted on the same fitting rows makes its ids and dense block
    split = time_split(train, 0.1, schema.time)
    fit, valid = train.take(pa.array(split.fit)), train.take(pa.array(split.valid))
    pipeline = FeaturePipeline.fit(fit, schema, "pooled-history", features)
    data = work / f"{name}-reference"
    data.mkdir(parents=True, exist_ok=True)
    for part, table in (("fit", fit), ("valid", valid), ("test", test)):
        np.savez(data / f"{part}.npz", **reference_arrays(pipeline, table))
    sizes = {f"sparse__{c}": pipeline.vocabularies[c].num_embeddings + 1 for c in schema.categorical_columns}  # + the padding id
    settings = {"dim": args.dim, "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "sizes": sizes,
                "item": f"sparse__{schema.item}", "category": f"sparse__{schema.category}", "threads": args.threads}
    (data / "settings.json").write_text(json.dumps(settings))
    started = time.perf_counter()
    subprocess.run([str(python), str(TRAINER), str(data)], check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    seconds = time.perf_counter() - started
    trained = json.loads((data / "result.json").read_text())
    scores = np.load(data / "test_scores.npy")
    metrics = ranking_metrics(test_frame.assign(score=scores))
    rows.append({"data": name, "model": "DeepCTR-Torch DIN (reference)", "train_rows": train.num_rows, "test_rows": test.num_rows,
                 "test_auc": round(metrics["auc"], 4), "test_gauc": round(metrics["gauc"], 4),
                 "best_epoch": trained["best_epoch"], "valid_auc": round(trained["valid_auc"], 4),
                 "setting": "DeepCTR-Torch defaults (Adam 1e-3, attention 64-16 Dice, DNN 256-128)", "seconds": round(seconds, 1)})
    rows[0]["auc_vs_reference"] = round(rows[0]["test_auc"] - rows[1]["test_auc"], 4)
    rows[0]["goal_met"] = bool(rows[0]["auc_vs_reference"] >= -0.003)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A 1,000-user simulator world (ml-latest-small is small already).")
    parser.add_argument("--data", default="simulator,movielens", help="Comma-separated: simulator, movielens.")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--history-len", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding-lrs", type=float, nargs="+", default=[0.05, 0.01, 0.002],
                        help="Our tables' row-wise Adagrad learning rates; the best validation AUC is kept.")
    args = parser.parse_args()
    python = reference_python()
    rows = []
    with tempfile.TemporaryDirectory(prefix="din-reference-") as tmp:
        for name in [d.strip() for d in args.data.split(",") if d.strip()]:
            if name == "movielens" and not (SHARED_MOVIELENS / "ratings.csv").exists():
                print(f"skipping movielens: {SHARED_MOVIELENS} not found")
                continue
            rows += run_dataset(name, Path(tmp), python, args)
    write_results("din_reference", rows, notes="ours within 0.003 test AUC of DeepCTR-Torch's DIN on the same rows, or better (issue 33)")


if __name__ == "__main__":
    main()
