"""Retrieval quality of the behaviour LM (`lum evaluate`'s protocol) and TIGER's cold-item test, on two datasets.

    python -m benchmarks.bench_retrieval_quality                       # simulator (3,000 users) and ml-latest-small
    python -m benchmarks.bench_retrieval_quality --datasets simulator  # without ../shared/data
    python -m benchmarks.bench_retrieval_quality --quick               # `make bench` quick mode: simulator, 800 users, 3 epochs

For each dataset: the per-user split (pipelines/data/split.py: each user's last events are the test window, the
rest before them the LM's pretraining and the ranker's training windows); per hold-out share h (0: the plain
protocol; 0.05: TIGER's cold-start protocol) a seeded share h of the pretraining window's items is dropped from
it; a semantic-id LM and an id LM (tiny preset, the same settings) are pretrained on what is left, and
`lum.evaluate.evaluate_next_item` scores both against popularity, recent items and the SASRec-style baseline
(trained on the same window, stopped on its own validation split): HR@10, NDCG@10 and Recall@50 of each user's
last test behaviour, the history being everything strictly before it; with h > 0 also how often the held-out items
are retrieved and their recall. Nothing here looks at the test window to choose a setting: the LM settings are the
configs' (configs/demo.yaml, configs/movielens.yaml), the SASRec settings its defaults.

Writes benchmarks/results/retrieval_quality.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa

from benchmarks.common import REPO_ROOT, write_results

MOVIELENS = REPO_ROOT.parent / "shared" / "data" / "ml-latest-small"


def dataset(name: str, users: int) -> tuple[pa.Table, pd.DataFrame, dict, dict]:
    """(events, items, id tokenizer settings, semantic tokenizer settings) of one dataset."""
    if name == "simulator":
        from pipelines.data.sources.simulator import preset, simulate

        events, items = simulate(preset("default", n_users=users, chunk_users=users))
        base = {"condition_columns": ("surface", "device", "daypart")}
        semantic = {**base, "item_tokenization": "semantic", "vector_column": "content", "categorical_columns": ("category",),
                    "semantic_codebook_size": 64, "semantic_levels": 2}  # configs/demo.yaml
        return events, items.to_pandas(), base, semantic
    if name == "ml-latest-small":
        from pipelines.data.sources.movielens import load_movielens

        if not (MOVIELENS / "ratings.csv").exists():
            raise SystemExit(f"{MOVIELENS} not found: pass --datasets simulator, or put ml-latest-small there")
        source = load_movielens(MOVIELENS)
        base = {"condition_columns": ("feedback",), "max_history": 200, "min_item_count": 2}  # configs/movielens.yaml
        semantic = {**base, "item_tokenization": "semantic", "text_columns": ("title",), "categorical_columns": ("genres",),
                    "numeric_columns": ("year",), "semantic_codebook_size": 64, "semantic_levels": 3}  # 64^2 < 9,742 films: 3 levels
        return source.events, source.items.to_pandas(), base, semantic
    raise SystemExit(f"unknown dataset {name}: expected simulator or ml-latest-small")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="simulator,ml-latest-small")
    parser.add_argument("--holdouts", default="0,0.05", help="shares of items held out of pretraining")
    parser.add_argument("--users", type=int, default=3000, help="simulator users")
    parser.add_argument("--epochs", type=int, default=10, help="LM pretraining epochs (the configs' 10)")
    parser.add_argument("--max-users", type=int, default=2000, help="evaluated users (a seeded sample), as `lum evaluate`")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.users, args.epochs, args.holdouts = "simulator", 800, 3, "0.05"

    from lum.config import EvalConfig, PretrainConfig, TokenizerConfig
    from lum.evaluate import evaluate_next_item, hold_out_items
    from lum.model import load_model
    from lum.pretrain import pretrain
    from lum.tokenizer import BehaviourTokenizer
    from pipelines.data.split import SplitConfig, split_events

    rows = []
    config = EvalConfig(max_users=args.max_users, sasrec=True)
    for name in args.datasets.split(","):
        events, items, id_settings, semantic_settings = dataset(name, args.users)
        tables, _ = split_events(events, SplitConfig("per-user"))
        windows = {k: v.to_pandas() for k, v in tables.items()}
        history = pd.concat([windows["pretrain"], windows["train"]], ignore_index=True)
        for share in (float(h) for h in args.holdouts.split(",")):
            cold = hold_out_items(windows["pretrain"], share, seed=0) if share > 0 else None
            warm = windows["pretrain"] if cold is None else windows["pretrain"][~windows["pretrain"].item_id.astype(str).isin(set(cold))]
            with tempfile.TemporaryDirectory() as tmp:
                for tokenization, settings in (("semantic", semantic_settings), ("id", id_settings)):
                    folder = Path(tmp) / tokenization
                    pretrain(warm, folder, PretrainConfig(preset="tiny", epochs=args.epochs), TokenizerConfig(**settings), items, progress=True)
                    tokenizer = BehaviourTokenizer.load(folder)
                    result = evaluate_next_item(load_model(folder).model, tokenizer, history, windows["test"], config, progress=True,
                                                train_events=warm, cold_items=cold)
                    for method, metrics in result["overall"].items():
                        if method != "model" and tokenization == "id":
                            continue  # the baselines do not depend on the LM's tokenization: listed once
                        row = {"dataset": name, "held_out": share, "method": f"LM ({tokenization} ids)" if method == "model" else method,
                               "users": result["users"], **{k: round(v, 4) for k, v in metrics.items()},
                               "not_generable": round(result["target_not_generable"], 4) if method == "model" else None}
                        if cold is not None:
                            stats = result["cold_items"][method]
                            row.update({"cold_items": len(cold), "cold_targets": stats["cold_targets"],
                                        "cold_share_of_top10": round(stats["cold_share_of_top10"], 4),
                                        "cold_recall@50": None if stats["cold_recall@50"] is None else round(stats["cold_recall@50"], 4)})
                        if method == "sasrec":
                            row["note"] = f"stopped at epoch {result['sasrec']['best_epoch']} (validation NDCG@10 {result['sasrec']['validation_ndcg@10']})"
                        rows.append(row)
                        print(row, flush=True)
    write_results("retrieval_quality", rows, notes=f"tiny LM, {args.epochs} epochs; beam {config.beam}; per-user split; "
                  f"{args.max_users} evaluated users at most; simulator default world with {args.users} users")


if __name__ == "__main__":
    main()
