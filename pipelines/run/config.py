"""`lum run --config run.yaml`: every step from events to the A/B report, resumable.

    data -> split -> pretrain the LM -> next-item evaluation -> embed (rolling or snapshot) -> Feast
         -> training sets -> rankers (DLRM, LightGBM x variants) -> evaluation -> scored test window -> report

Each step keeps its output in the run folder and is skipped when that output is up to date, so running the
same config again after a failure resumes at the failed step. `run_state.json` records each step's duration.

A config (YAML; every key optional, defaults below):

    run_dir: runs/demo
    data: {source: simulator, preset: default, seed: 0}       # or {source: movielens, path: ../shared/data/ml-latest-small}
    protocols:                                                # one or more; distinct splits
      - {split: global, features: rolling}                    # features: rolling | snapshot (snapshot_every: 1D)
    lm: {preset: tiny, epochs: 10, max_history: 100}         # item_tokenization: semantic, vector_column: content, ...
    embed: {engine: vllm, conditions: [request, surface=home, surface=cart]}   # default: request + one per surface
    rankers: {models: [dlrm, lightgbm], variants: [base, lum, pooled-history, lum+pooled], epochs: 5}
    report: {bootstrap: 200}
    targets: {gauc_lift_min: 0.01, ctr_lift_min: 0.03}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipelines.cli.common import UP_TO_DATE
from pipelines.data.contract import read_events, write_json_atomic, write_parquet_atomic
from pipelines.paths import RunPaths


@dataclass(frozen=True)
class DataConfig:
    source: str = "simulator"  # simulator | movielens
    preset: str = "default"  # simulator preset
    seed: int = 0
    n_users: int | None = None
    path: str | None = None  # movielens folder
    like_threshold: float = 4.0


@dataclass(frozen=True)
class ProtocolConfig:
    split: str = "global"  # global | per-user
    features: str = "rolling"  # rolling: one embedding per (user, request time); snapshot: one per user per period
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    snapshot_every: str = "1D"

    @property
    def name(self) -> str:
        return f"{self.split}+{self.features}"


@dataclass(frozen=True)
class LMConfig:
    preset: str = "tiny"
    epochs: int = 10
    row_tokens: int = 512
    rows_per_batch: int = 8
    lr: float = 3e-3
    max_history: int = 100
    min_item_count: int = 5
    min_condition_count: int = 5
    history_events: str = "auto"
    # Item tokenization: `id` (a token per frequent item) or `semantic` (codes from the items' content; see
    # lum/semantic_ids.py), with the items-table columns the content is read from.
    item_tokenization: str = "id"
    vector_column: str | None = None
    categorical_columns: tuple[str, ...] = ()
    text_columns: tuple[str, ...] = ()
    numeric_columns: tuple[str, ...] = ()
    semantic_codebook_size: int = 256
    semantic_levels: int = 3
    # id mode only: item factors (lum/item_factors.py), a shared category component and a content map
    share_category: bool = False
    content_column: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class EmbedConfig:
    engine: str = "vllm"
    conditions: tuple[str, ...] = ()  # empty: one condition per value of the first condition column


@dataclass(frozen=True)
class RankersConfig:
    models: tuple[str, ...] = ("dlrm", "lightgbm")
    variants: tuple[str, ...] = ("base", "lum", "pooled-history", "lum+pooled")
    epochs: int = 5
    batch_size: int = 2048
    embedding_dim: int = 32
    embedding_lr: float | None = None
    patience: int | None = None  # DLRM early stopping (ranker.dlrm.DLRMConfig's default when None)
    evals_per_epoch: int | None = None  # DLRM validations per epoch (ranker.dlrm.DLRMConfig's default when None)
    listwise_weight: float | None = None  # DLRM: weight of the per-request listwise loss (DLRMConfig's default, 0, when None)
    threads: int | None = None
    lum_inputs: str = "scores"  # scores | vectors (see ranker.features.FeatureConfig)
    lightgbm_ids: bool = False
    dlrm_ids: bool = True  # DLRM: embed the raw user and item ids (ranker.features.FeatureConfig)
    lightgbm_stopping_metric: str = "auc"  # LightGBM: the validation metric that picks the iteration (auc | binary_logloss)
    request_features: bool = False  # scores relative to the request's other candidates (ranker.features.FeatureConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        # checked here, when the config is read, not when the ranker step reaches them after pretraining
        if self.lightgbm_stopping_metric not in ("auc", "binary_logloss"):
            raise ValueError(f"rankers.lightgbm_stopping_metric must be auc or binary_logloss, got '{self.lightgbm_stopping_metric}'")
        if self.listwise_weight is not None and not self.listwise_weight >= 0:
            raise ValueError(f"rankers.listwise_weight must be >= 0, got {self.listwise_weight}")

    def ranker_options(self) -> dict[str, Any]:
        """Every field but the model and variant lists: the keywords of `pipelines.cli.ranker.ranker_config`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("models", "variants")}


@dataclass(frozen=True)
class ReportRunConfig:
    bootstrap: int = 200
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    protocols: tuple[ProtocolConfig, ...] = (ProtocolConfig(),)
    lm: LMConfig = field(default_factory=LMConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    rankers: RankersConfig = field(default_factory=RankersConfig)
    report: ReportRunConfig = field(default_factory=ReportRunConfig)
    targets: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        splits = [p.split for p in self.protocols]
        if len(set(splits)) != len(splits):
            # one LM per split; two feature modes of one LM would share its model version in the feature store
            raise ValueError(f"protocols must have distinct splits (got {splits}); run a second config for another feature mode")
        for p in self.protocols:
            if p.split not in ("global", "per-user") or p.features not in ("rolling", "snapshot"):
                raise ValueError(f"protocol {p}: split must be global|per-user and features rolling|snapshot")


def _build(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """A dataclass from a YAML mapping; unknown keys are an error that names them."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    values = {}
    for name, value in data.items():
        kind = known[name].type
        if name == "protocols":
            values[name] = tuple(_build(ProtocolConfig, p, f"{where}.protocols[{i}]") for i, p in enumerate(value))
        elif isinstance(kind, str) and kind in {"DataConfig", "LMConfig", "EmbedConfig", "RankersConfig", "ReportRunConfig"}:
            values[name] = _build(globals()[kind], value, f"{where}.{name}")
        elif isinstance(value, list):
            values[name] = tuple(value)
        else:
            values[name] = value
    return cls(**values)


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping (see `lum run --help`)")
    for key, value in (overrides or {}).items():
        if value is not None:
            section, _, name = key.partition(".")
            if name:
                data.setdefault(section, {})[name] = value
            else:
                data[section] = value
    return _build(RunConfig, data, str(path or "config"))


def config_dict(config: Any) -> Any:
    return json.loads(json.dumps(asdict(config) if is_dataclass(config) else config, default=str))


# ---------------------------------------------------------------------------------------------------------------
class RunState:
    """`run_state.json`: the config and each step's duration and status, updated as steps finish."""

    def __init__(self, paths: RunPaths, config: RunConfig):
        self.path = paths.root / "run_state.json"
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.state = {"config": config_dict(config), "steps": previous.get("steps", {})}

    def step(self, name: str, fn: Callable[[], Any], echo: Callable[[str], None]) -> Any:
        """Runs `fn` as the step `name` and records its status and seconds; returns what `fn` returns.

        A step that returns UP_TO_DATE did nothing: it keeps the seconds of the run that made its output (and is
        marked `reused`), so the report's step durations stay those of the work.
        """
        echo(f"--- {name}")
        started = time.perf_counter()
        previous = self.state["steps"].get(name, {})
        self.state["steps"][name] = {"status": "running"}
        self._write()
        try:
            result = fn()
        except BaseException:
            self.state["steps"][name] = {"status": "failed", "seconds": round(time.perf_counter() - started, 1)}
            self._write()
            raise
        seconds = round(time.perf_counter() - started, 1)
        reused = isinstance(result, str) and result == UP_TO_DATE
        if reused and previous.get("status") == "done" and "seconds" in previous:
            # nothing was redone: the duration stays that of the run which made the output
            self.state["steps"][name] = {"status": "done", "seconds": previous["seconds"], "reused": True}
        else:
            self.state["steps"][name] = {"status": "done", "seconds": seconds, **({"reused": True} if reused else {})}
        self._write()
        return result

    def durations(self) -> dict[str, float]:
        return {k: v.get("seconds", 0.0) for k, v in self.state["steps"].items()}

    def _write(self) -> None:
        write_json_atomic(self.state, self.path)


# LM settings a trained model folder must share with the config that re-uses it: (config key, where the model keeps
# it, the value a model written before the key existed means)
_MODEL_SETTINGS = (
    ("epochs", "pretrain", None), ("row_tokens", "pretrain", None), ("rows_per_batch", "pretrain", None), ("lr", "pretrain", None),
    ("seed", "pretrain", None), ("share_category", "pretrain", False), ("content_column", "pretrain", None),
    ("item_tokenization", "tokenizer", "id"), ("max_history", "tokenizer", None), ("min_item_count", "tokenizer", None),
    ("min_condition_count", "tokenizer", None), ("vector_column", "tokenizer", None), ("categorical_columns", "tokenizer", ()),
    ("text_columns", "tokenizer", ()), ("numeric_columns", "tokenizer", ()), ("semantic_codebook_size", "tokenizer", 256),
    ("semantic_levels", "tokenizer", 3),
)


def check_model_matches(model_dir: Path, lm: LMConfig) -> None:
    """Fails, naming the setting, when the run's trained LM was made with other LM settings than the config asks.

    The pretrain step is skipped when its model folder exists; without this check a changed `lm:` section would
    silently keep the old model (and every embedding, feature and ranker built from it).
    """
    manifest = json.loads((model_dir / "lum_manifest.json").read_text())
    tokenizer = json.loads((model_dir / "behaviour_tokenizer.json").read_text())["config"]
    kept = {"pretrain": manifest.get("pretrain_config", {}), "tokenizer": tokenizer}
    semantic_only = {"vector_column", "categorical_columns", "text_columns", "numeric_columns", "semantic_codebook_size", "semantic_levels"}
    differ = []
    for key, where, default in _MODEL_SETTINGS:
        if key in semantic_only and lm.item_tokenization != "semantic":
            continue
        have = kept[where].get(key, default)
        want = getattr(lm, key)
        if isinstance(want, tuple) or isinstance(have, list):
            have, want = tuple(have or ()), tuple(want or ())
        if have != want:
            differ.append(f"{key}: the model has {have!r}, the config asks {want!r}")
    if differ:
        raise ValueError(f"{model_dir} was pretrained with other LM settings ({'; '.join(differ)}); remove that folder (and the run's "
                         "embeddings/, feature_repo/, training_sets/, rankers/) to pretrain again, or use another run_dir")


def embed_in_subprocess(model_dir: Path, events: Path, as_of: str, out_dir: Path, engine: str, conditions: str) -> None:
    """`lum embed` as its own process: vLLM's engine processes then never outlive or disturb the caller."""
    command = [sys.executable, "-m", "pipelines.cli", "embed", "--model", str(model_dir), "--events", str(events),
               "--as-of", as_of, "--engine", engine, "--out", str(out_dir), "--conditions", conditions]
    done = subprocess.run(command)
    if done.returncode != 0:
        raise RuntimeError(f"the embedding step failed (exit {done.returncode}): {' '.join(command)}")


def query_conditions(model_dir: Path, configured: tuple[str, ...], rolling: bool, events: Path) -> str:
    """The configured query conditions, or by default: in rolling mode `request` (each row's own context, the
    condition LUM's ranker features are about), plus one per value of the model's first condition column."""
    if configured:
        if "request" in configured and not request_time_conditions(model_dir, events):
            raise ValueError("embed.conditions asks `request`, but the model's condition columns are not all known at request time "
                             "(querying a row's own post-event context would leak its label)")
        return ",".join(configured)
    from lum.tokenizer import BehaviourTokenizer

    manifest = json.loads((model_dir / "lum_manifest.json").read_text())
    first = manifest["condition_columns"][0]
    tokenizer = BehaviourTokenizer.load(model_dir, expected_fingerprint=manifest["tokenizer_fingerprint"])
    names = [t[2:] for t in tokenizer.condition_tokens if t[2:].startswith(f"{first}=") and "|" not in t[2:]]
    if not names:
        raise ValueError(f"{model_dir}: no condition token of the form {first}=VALUE; set embed.conditions in the run config")
    return ",".join((["request"] if rolling and request_time_conditions(model_dir, events) else []) + sorted(names))


def request_time_conditions(model_dir: Path, events: Path) -> bool:
    """Whether every condition column of the model is known at request time. Only then may a row's own context be
    a query condition: MovieLens' feedback level is derived from the rating, so querying it would leak the label."""
    from pipelines.data.contract import METADATA_KEY, EventContract

    manifest = json.loads((model_dir / "lum_manifest.json").read_text())
    contract = EventContract.from_json(pq.read_schema(events).metadata[METADATA_KEY])
    known = {c.name: c.known_at for c in contract.conditions}
    return all(known.get(c) == "request" for c in manifest["condition_columns"])


def embedding_rows(paths: RunPaths, split: str, out: Path) -> Path:
    """(user_id, ts, condition columns) of the ranker-training and test windows: the moments (and contexts) a
    rolling embedding is needed for."""
    if not out.exists():  # kept once written: the embedding job's resume check fingerprints this file
        _, contract = read_events(paths.split_file(split, "train"))
        columns = ["user_id", "ts", *contract.condition_names]
        tables = [pq.read_table(paths.split_file(split, w), columns=columns) for w in ("train", "test")]
        write_parquet_atomic(pa.concat_tables(tables), out)
    return out


def snapshot_times(paths: RunPaths, split: str, every: str) -> str:
    """Period boundaries from the start of the training window to the end of the test window."""
    summary = json.loads(paths.split_summary(split).read_text())["windows"]
    start = pd.Timestamp(summary["train"]["ts_min"]).floor(every)
    end = pd.Timestamp(summary["test"]["ts_max"])
    return ",".join(t.isoformat() for t in pd.date_range(start, end, freq=every))
