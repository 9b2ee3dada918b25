"""Run-folder steps of the behaviour LM: pretrain on a split's pretraining window, evaluate on its test window."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from pipelines.data.contract import read_events, write_json_atomic
from pipelines.paths import RunPaths
from pipelines.data.sources.base import read_dataset_info


def _window(paths: RunPaths, protocol: str, window: str) -> pd.DataFrame:
    path = paths.split_file(protocol, window)
    if not paths.split_summary(protocol).exists():
        raise FileNotFoundError(f"{paths.split_dir(protocol)} has no finished split: run `lum data split --protocol {protocol}` first")
    table, _ = read_events(path)
    return table.to_pandas()


def _items(paths: RunPaths) -> pd.DataFrame | None:
    return pq.read_table(paths.items).to_pandas() if paths.items.exists() else None


def default_history_events(paths: RunPaths) -> str:
    """MovieLens ratings are all behaviours (the feedback level is the condition); elsewhere clicks are."""
    return "all" if read_dataset_info(paths)["source"].get("name") == "movielens" else "positive"


def run_pretrain(
    paths: RunPaths,
    protocol: str,
    pretrain_config: Any,
    tokenizer_options: dict[str, Any],
    init_from: str | None = None,
    force: bool = False,
    progress: bool = True,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Pretrain on the split's pretraining window into the run's model folder (or `out_dir`)."""
    from lum.pretrain import pretrain
    from lum.tokenizer import TokenizerConfig

    events = _window(paths, protocol, "pretrain")
    _, contract = read_events(paths.split_file(protocol, "pretrain"))
    options = dict(tokenizer_options)
    if not options.get("condition_columns"):
        options["condition_columns"] = tuple(contract.condition_names)
    if options.get("history_events", "auto") == "auto":
        options["history_events"] = default_history_events(paths)
    tokenizer_config = TokenizerConfig(**options)
    out = out_dir or paths.model_dir(protocol, pretrain_config.preset)
    return pretrain(
        events,
        out,
        pretrain_config,
        tokenizer_config,
        items=_items(paths),
        init_from=init_from,
        progress=progress,
        overwrite=force,
        extra_manifest={"run": str(paths.root), "split_protocol": protocol},
    )


def run_evaluate(paths: RunPaths, protocol: str, preset: str, eval_config: Any, progress: bool = True) -> dict[str, Any]:
    from lum.evaluate import evaluate_next_item
    from lum.model import load_model
    from lum.tokenizer import BehaviourTokenizer

    model_dir = paths.model_dir(protocol, preset)
    loaded = load_model(model_dir)
    tokenizer = BehaviourTokenizer.load(model_dir, expected_fingerprint=loaded.manifest["tokenizer_fingerprint"])
    history = pd.concat([_window(paths, protocol, "pretrain"), _window(paths, protocol, "train")], ignore_index=True)
    result = evaluate_next_item(loaded.model, tokenizer, history, _window(paths, protocol, "test"), eval_config, progress)
    result["model_version"] = loaded.manifest["model_version"]
    result["config"] = asdict(eval_config)
    write_json_atomic(result, paths.evaluation(protocol, preset))
    return result
