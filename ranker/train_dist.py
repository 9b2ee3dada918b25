"""Entry point for training a ranker from a training-set Parquet file, in one process or many:

    python -m ranker.train_dist --train T.parquet --out DIR --variant lum
    torchrun --nproc_per_node=2 -m ranker.train_dist --train T.parquet --out DIR --variant lum

Under torchrun every rank reads the file, the DLRM's tables are sharded over the ranks, each rank trains on its
slice of every batch, and rank 0 writes the ranker folder. `--config` takes a JSON RankerConfig (as saved in a
ranker's ranker.json under "config"); the flags override it.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from contracts.names import VARIANTS


def main(argv: list[str] | None = None) -> None:
    from ranker.train import RankerConfig, train_ranker

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="training-set Parquet (with its lum.training_set metadata)")
    parser.add_argument("--out", required=True, help="ranker folder to write")
    parser.add_argument("--config", help="JSON file holding a RankerConfig")
    parser.add_argument("--model", choices=["dlrm", "lightgbm"])
    parser.add_argument("--variant", choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--embedding-dim", type=int)
    parser.add_argument("--engine", choices=["dmp", "plain"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--valid-fraction", type=float)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    config = RankerConfig.from_json(json.loads(Path(args.config).read_text())) if args.config else RankerConfig()
    top = {k: v for k, v in {"model": args.model, "variant": args.variant, "valid_fraction": args.valid_fraction}.items() if v is not None}
    dlrm = {
        k: v
        for k, v in {
            "epochs": args.epochs, "batch_size": args.batch_size, "embedding_dim": args.embedding_dim, "engine": args.engine, "seed": args.seed
        }.items()
        if v is not None
    }
    lightgbm = {"seed": args.seed} if args.seed is not None else {}
    config = replace(config, **top, dlrm=replace(config.dlrm, **dlrm), lightgbm=replace(config.lightgbm, **lightgbm))

    ranker = train_ranker(pq.read_table(args.train), config, progress=args.progress)
    if int(os.environ.get("RANK", "0")) == 0:
        ranker.save(args.out)
        print(json.dumps({"out": args.out, **{k: v for k, v in ranker.training.items() if k not in ("log", "feature_names")}}, default=str))


if __name__ == "__main__":
    main()
