"""Run-folder steps of the behaviour LM: pretrain on a split's pretraining window, evaluate on its test window."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from contracts.embeddings import MODEL_MANIFEST_FILE
from contracts.files import write_json_atomic
from lum.config import PretrainConfig, TokenizerConfig
from lum.tokenizer import TOKENIZER_FILE
from pipelines.data.contract import read_contract, read_events
from pipelines.data.sources.base import read_dataset_info
from pipelines.paths import RunPaths
from pipelines.steps import UP_TO_DATE


def _require_split(paths: RunPaths, protocol: str) -> None:
    if not paths.split_summary(protocol).exists():
        raise FileNotFoundError(f"{paths.split_dir(protocol)} has no finished split: run `lum data split --protocol {protocol}` first")


def _window(paths: RunPaths, protocol: str, window: str) -> pd.DataFrame:
    _require_split(paths, protocol)
    table, _ = read_events(paths.split_file(protocol, window))
    return table.to_pandas()


def _items(paths: RunPaths) -> pd.DataFrame | None:
    return pq.read_table(paths.items).to_pandas() if paths.items.exists() else None


def default_history_events(paths: RunPaths) -> str:
    """MovieLens ratings are all behaviours (the feedback level is the condition); elsewhere clicks are."""
    return "all" if read_dataset_info(paths)["source"].get("name") == "movielens" else "positive"


def resolve_tokenizer(paths: RunPaths, protocol: str, tokenizer: TokenizerConfig) -> TokenizerConfig:
    """The tokenizer settings with the data's defaults filled in: every condition column of the log when none is
    named, and `auto` history events decided by the data source."""
    _require_split(paths, protocol)
    contract = read_contract(paths.split_file(protocol, "pretrain"))
    changes: dict[str, Any] = {}
    if not tokenizer.condition_columns:
        changes["condition_columns"] = tuple(contract.condition_names)
    if tokenizer.history_events == "auto":
        changes["history_events"] = default_history_events(paths)
    return replace(tokenizer, **changes)


# pretraining settings that do not change the weights a model folder holds: a re-run may differ in them
_RUNTIME_ONLY = {"checkpoint_every", "threads"}
_SEMANTIC_ONLY = {"vector_column", "categorical_columns", "text_columns", "numeric_columns", "semantic_codebook_size", "semantic_levels"}


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def check_model_matches(model_dir: Path, pretrain_config: PretrainConfig, tokenizer: TokenizerConfig) -> None:
    """Fails, naming the setting, when a trained model folder was made with other settings than those asked.

    The pretrain step is skipped when its model folder exists; without this check a changed `lm:` section would
    silently keep the old model (and every embedding, feature and ranker built from it). A setting the folder
    does not record (written before the setting existed) counts as that setting's default.
    """
    manifest = json.loads((model_dir / MODEL_MANIFEST_FILE).read_text())
    saved = {"pretrain": manifest.get("pretrain_config", {}), "tokenizer": json.loads((model_dir / TOKENIZER_FILE).read_text())["config"]}
    wanted = {"pretrain": pretrain_config, "tokenizer": tokenizer}
    differ = []
    for section, config in wanted.items():
        defaults = type(config)()
        for f in fields(config):
            if f.name in _RUNTIME_ONLY or (section == "tokenizer" and f.name in _SEMANTIC_ONLY and tokenizer.item_tokenization != "semantic"):
                continue
            have, want = _comparable(saved[section].get(f.name, getattr(defaults, f.name))), _comparable(getattr(config, f.name))
            if have != want:
                differ.append(f"lm.{section}.{f.name}: the model has {have!r}, the config asks {want!r}")
    if differ:
        raise ValueError(f"{model_dir} was pretrained with other LM settings ({'; '.join(differ)}); remove that folder (and the run's "
                         "embeddings/, feature_repo/, training_sets/, rankers/) to pretrain again, or use another run_dir")


def pretrain_step(
    paths: RunPaths,
    protocol: str,
    pretrain_config: PretrainConfig,
    tokenizer: TokenizerConfig,
    init_from: str | None = None,
    force: bool = False,
    progress: bool = True,
    out_dir: Path | None = None,
) -> dict[str, Any] | str:
    """Pretrain on the split's pretraining window into the run's model folder (or `out_dir`); the manifest, or
    UP_TO_DATE when the folder already holds a model made with these settings (an error when with others)."""
    from lum.pretrain import pretrain

    tokenizer_config = resolve_tokenizer(paths, protocol, tokenizer)
    out = out_dir or paths.model_dir(protocol, pretrain_config.preset)
    if (out / MODEL_MANIFEST_FILE).exists() and not force:
        check_model_matches(out, pretrain_config, tokenizer_config)
        return UP_TO_DATE
    return pretrain(
        _window(paths, protocol, "pretrain"),  # read only when there is a model to train
        out,
        pretrain_config,
        tokenizer_config,
        items=_items(paths),
        init_from=init_from,
        progress=progress,
        overwrite=force,
        extra_manifest={"run": str(paths.root), "split_protocol": protocol},
    )


def evaluate_step(paths: RunPaths, protocol: str, preset: str, eval_config: Any, progress: bool = True) -> dict[str, Any]:
    from lum.evaluate import evaluate_next_item
    from lum.model import load_model
    from lum.tokenizer import BehaviourTokenizer

    model_dir = paths.model_dir(protocol, preset)
    loaded = load_model(model_dir)
    tokenizer = BehaviourTokenizer.load(model_dir, expected_fingerprint=loaded.manifest["tokenizer_fingerprint"])
    pretrain_window = _window(paths, protocol, "pretrain")
    history = pd.concat([pretrain_window, _window(paths, protocol, "train")], ignore_index=True)
    engine = None
    if eval_config.engine == "vllm":
        import json

        from lum.retrieve import VllmRetrievalEngine

        max_len = int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
        engine = VllmRetrievalEngine(str(model_dir), max_len, max(eval_config.beam, eval_config.k, eval_config.recall_k))
    try:
        # condition columns known only after the event never reach the query (MovieLens' feedback level)
        after_event = tuple(c.name for c in read_contract(paths.split_file(protocol, "test")).conditions if c.known_at != "request")
        result = evaluate_next_item(loaded.model, tokenizer, history, _window(paths, protocol, "test"), eval_config, progress,
                                    train_events=pretrain_window, engine=engine, after_event=after_event)
    finally:
        if engine is not None:
            engine.close()
    result["model_version"] = loaded.manifest["model_version"]
    result["config"] = asdict(eval_config)
    write_json_atomic(result, paths.evaluation(protocol, preset), default=float)  # numpy scalars as floats
    return result
