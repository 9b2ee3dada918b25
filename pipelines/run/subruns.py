"""Runs made from one run's data: the same config under other seeds, and the validation run that chooses settings.

* **Seeds** (`seeds: N`, `lum run --seeds N`): seed k (1 .. N-1) is the config with every training seed (LM
  pretraining, semantic codebooks, DLRM, LightGBM) moved by k, run in `<run_dir>/seeds/seed-k/` on a copy of the
  run's events. The data and the split stay those of the run: what varies is training alone, so the spread across
  seeds is the variance a retrain would show, which the bootstrap over users does not cover.
* **Validation** (`holdout: validation`, `lum run --holdout validation`): the test window is cut off the log
  before anything is trained, and the config runs in `<run_dir>/validation/` on what is left, with the latest
  `validation_share` of the ranker-training window (by time; per user for the per-user split) standing in for the
  test window. The test rows are not in that folder at all, so no step of it (LM, features, early stopping, the
  report a setting is chosen by) can read them; a setting is chosen there, and the test window scored once, by the
  plain run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from contracts.files import write_json_atomic
from pipelines.data.contract import read_events
from pipelines.data.sources.base import SourceOutput, read_dataset_info, write_source_output
from pipelines.data.split import assign_windows, dataset_fingerprint
from pipelines.paths import RunPaths
from pipelines.run.config import DataConfig, ProtocolConfig, RunConfig
from pipelines.steps import UP_TO_DATE

SEEDS_DIR = "seeds"
VALIDATION_DIR = "validation"
SHARED_STAMP = "shared_from.json"  # beside a sub-run's dataset.json: which data of which run it copies


def seed_dir(run_dir: str | Path, k: int) -> Path:
    """The run folder of seed k of the run in `run_dir`."""
    return Path(run_dir) / SEEDS_DIR / f"seed-{k}"


def seed_config(config: RunConfig, k: int) -> RunConfig:
    """The config of seed k: every training seed moved by k, in `<run_dir>/seeds/seed-k/`, on the run's own data."""
    lm, rankers = config.lm, config.rankers
    return replace(
        config,
        run_dir=str(seed_dir(config.run_dir, k)),
        seeds=1,
        data=DataConfig(source="imported"),
        lm=replace(lm, pretrain=replace(lm.pretrain, seed=lm.pretrain.seed + k), tokenizer=replace(lm.tokenizer, seed=lm.tokenizer.seed + k)),
        rankers=replace(rankers, dlrm=replace(rankers.dlrm, seed=rankers.dlrm.seed + k), lightgbm=replace(rankers.lightgbm, seed=rankers.lightgbm.seed + k)),
    )


def validation_fractions(protocol: ProtocolConfig, share: float) -> tuple[float, float, float]:
    """The windows of the log without its test window: pretraining as before, the ranker-training window's latest
    `share` as the validation window. (0.6, 0.2, 0.2) with share 0.5 -> (0.75, 0.125, 0.125) of the 80% left."""
    pretrain, train, _ = protocol.fractions
    kept = pretrain + train
    return (pretrain / kept, train * (1 - share) / kept, train * share / kept)


def validation_protocol(protocol: ProtocolConfig, share: float) -> ProtocolConfig:
    """The protocol on the log without its test window: `validation_fractions`, or for `last_k` (k_train, k_test)
    the last k_test events of what is left as the validation window (leave-last-out: the second-last event) and
    the k_train before them for training, as the test run has."""
    if protocol.last_k is not None:
        return protocol
    return replace(protocol, fractions=validation_fractions(protocol, share))


def validation_config(config: RunConfig) -> RunConfig:
    """The config of the validation run, in `<run_dir>/validation/` (its test window is the validation window)."""
    protocols = tuple(validation_protocol(p, config.validation_share) for p in config.protocols)
    title = f"{config.report.title} (validation window: for choosing settings; the test window is not in this run)"
    return replace(config, run_dir=str(Path(config.run_dir) / VALIDATION_DIR), holdout="test", data=DataConfig(source="imported"),
                   protocols=protocols, report=replace(config.report, title=title))


def before_test_window(paths: RunPaths, protocol: ProtocolConfig) -> np.ndarray:
    """[events] bool: the rows of the run's log in the pretraining or ranker-training window of `protocol`'s split."""
    table, _ = read_events(paths.events)
    return assign_windows(table, protocol.split_config()) < 2


def share_data(paths: RunPaths, into: RunPaths, keep: np.ndarray | None = None, why: str = "seed", force: bool = False) -> dict[str, Any] | str:
    """The run's events (only the rows where `keep`, when given) and items as the imported data of run folder
    `into`; UP_TO_DATE when that folder already holds exactly them. dataset.json (written last) names the origin."""
    table, _ = read_events(paths.events)
    if keep is not None and len(keep) != table.num_rows:
        raise ValueError(f"share_data: {len(keep)} flags for {table.num_rows} events in {paths.events}")
    stamp = {"run": str(paths.root), "dataset_fingerprint": dataset_fingerprint(paths), "why": why,
             "rows": int(table.num_rows if keep is None else keep.sum())}
    stamp_file = into.data_dir / SHARED_STAMP
    if not force and into.dataset_info.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return UP_TO_DATE
    if keep is not None:
        table = table.filter(pa.array(keep))
    items = pq.read_table(paths.items) if paths.items.exists() else None
    source = read_dataset_info(paths)["source"]
    stamp_file.unlink(missing_ok=True)
    info = write_source_output(SourceOutput(table, items, source={**source, "copied_from": stamp}), into)
    write_json_atomic(stamp, stamp_file)
    return info
