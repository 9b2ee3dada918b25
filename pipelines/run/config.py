"""The run config: every step from events to the A/B report, composed of the components' own config dataclasses.

    run_dir: runs/demo
    data: {source: simulator, preset: default, seed: 0}        # or {source: movielens, path: ../shared/data/ml-latest-small}
                                                               # or {source: files, path: events.csv, conditions: [surface], ...}
    protocols:                                                 # one or more; two may share a split with other features
      - {split: global, features: snapshot, engine: vllm}      # features: snapshot (snapshot_every: 1D) | rolling
      - {split: global, features: rolling, engine: torch}      # engine: overrides embed.job.engine for this protocol
    lm:
      pretrain: {preset: tiny, epochs: 5}                      # lum.pretrain.PretrainConfig
      tokenizer: {item_tokenization: semantic, ...}            # lum.tokenizer.TokenizerConfig
      evaluate: {k: 10}                                        # lum.evaluate.EvalConfig
    embed:
      conditions: [request, surface=home]                      # default: request + one per value of the first condition column
      job: {engine: torch}                                     # lum.embed_job.EmbedJobConfig
    rankers:
      models: [dlrm, lightgbm]
      variants: [base, lum, pooled-history, lum+pooled]
      features: {request_features: true}                       # ranker.features.FeatureConfig
      dlrm: {epochs: 5, patience: 0}                           # ranker.dlrm.DLRMConfig
      lightgbm: {early_stopping_metric: auc}                   # ranker.gbdt.LightGBMConfig
    features: {offline_store: duckdb}                          # file | duckdb | ray (ray_address, ray_cpus)
    report: {n_bootstrap: 200}                                 # pipelines.report.spec.ReportConfig
    targets: {gauc_lift_min: 0.01, ctr_lift_min: 0.03}
    tracking: {mlflow: file:///srv/mlruns}                     # log settings, metrics, report to MLflow (optional)

Every key is optional; a default is the component's own. `load_run_config` validates the whole tree: an unknown
key, a wrong type or an out-of-range value is a `ConfigError` naming the key (and, for a key that lives in
another section, where it belongs).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import TypeAdapter, ValidationError

from contracts.names import VARIANTS
from contracts.settings import Field, config_class
from lum.config import EmbedJobConfig, EvalConfig, PretrainConfig, TokenizerConfig
from pipelines.data.sources.files import FilesConfig
from pipelines.data.split import Fractions, Protocol, SplitConfig
from pipelines.report.spec import ReportConfig
from ranker.config import DLRMConfig, FeatureConfig, LightGBMConfig, RankerConfig
from ranker.schema import variant_parts

_SPLIT = SplitConfig()
_RANKER = RankerConfig()


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file and the key."""


@config_class
class DataConfig(FilesConfig):
    """Where the run's events come from; with `source: files`, FilesConfig's keys say how your log is read."""

    source: Literal["simulator", "movielens", "files", "imported"] = Field(
        "simulator", description="The embedded simulator, a MovieLens folder, your own files, or what `lum data import` already put in run_dir.")
    preset: Literal["tiny", "default", "large"] = Field("default", description="simulator: size preset.")
    seed: int = Field(0, description="simulator: random seed (the same seed gives the same data).")
    n_users: int | None = Field(None, ge=1, description="simulator: override the preset's number of users.")
    path: str | None = Field(None, description="movielens: the MovieLens folder; files: the events file (CSV or Parquet).")
    like_threshold: float = Field(4.0, description="movielens: label = 1 when rating >= this.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source in ("movielens", "files") and not self.path:
            what = "a MovieLens folder" if self.source == "movielens" else "the events file"
            raise ValueError(f"data.path must name {what} when data.source is {self.source}")
        if self.source == "files" and not self.conditions:
            raise ValueError("data.conditions must name the log's condition columns (NAME[:known_at]) when data.source is files")
        defaults = FilesConfig()
        stray = [f.name for f in fields(FilesConfig) if f.name != "on_bad" and getattr(self, f.name) != getattr(defaults, f.name)]
        if stray and self.source != "files":
            raise ValueError(f"data.{', data.'.join(stray)} apply to source files only (data.source is {self.source})")
        if self.source == "imported" and self.path:
            raise ValueError("data.path does not apply to source imported: the data is the run folder's own (import it with `lum data import files --run DIR`)")

    def files_config(self) -> FilesConfig:
        """The FilesConfig part of this section."""
        return FilesConfig(**{f.name: getattr(self, f.name) for f in fields(FilesConfig)})


@config_class
class ProtocolConfig:
    """One evaluation protocol: how the events are split and how the LUM features are computed."""

    split: Protocol = Field(_SPLIT.protocol, description="global (windows by time) or per-user (each user's last events held out).")
    features: Literal["rolling", "snapshot"] = Field(
        "rolling", description="rolling: one embedding per (user, request time); snapshot: one per user per period.")
    fractions: Fractions = Field(_SPLIT.fractions, description="Shares of the pretraining, ranker-training and test windows.")
    last_k: tuple[int, int] | None = Field(None, description="per-user: each user's last k events for ranker training and for test "
                                                             "(instead of fractions); [1, 1] with the LM's next-item metrics is leave-last-out.")
    snapshot_every: str = Field("1D", description="snapshot: the period between as-of times (a pandas frequency).")
    engine: Literal["vllm", "torch"] | None = Field(None, description="The embedding engine of this protocol (default: embed.job.engine).")

    def __post_init__(self) -> None:
        try:
            pd.tseries.frequencies.to_offset(self.snapshot_every)
        except ValueError as exc:
            raise ValueError(f"snapshot_every must be a pandas frequency such as 1D or 12h, got '{self.snapshot_every}'") from exc

    @property
    def name(self) -> str:
        return f"{self.split}+{self.features}"

    def split_config(self) -> SplitConfig:
        return SplitConfig(protocol=self.split, fractions=self.fractions, last_k=self.last_k)


@config_class
class LMConfig:
    """The behaviour LM: how it is tokenized, pretrained and evaluated."""

    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="lum.pretrain.PretrainConfig")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="lum.tokenizer.TokenizerConfig")
    evaluate: EvalConfig = Field(default_factory=EvalConfig, description="lum.evaluate.EvalConfig")


@config_class
class EmbedConfig:
    """Which query conditions the run embeds, and the embedding job's settings."""

    conditions: tuple[str, ...] = Field(
        (), description="Query conditions; default: `request` (rolling, when every condition is known at request time) "
                        "plus one per value of the model's first condition column.")
    job: EmbedJobConfig = Field(default_factory=EmbedJobConfig, description="lum.embed_job.EmbedJobConfig")

    def __post_init__(self) -> None:
        if self.job.conditions != EmbedJobConfig().conditions:
            raise ValueError("set the query conditions in embed.conditions (a list), not in embed.job.conditions")


@config_class
class RankersConfig:
    """Which rankers the run trains (every model x variant) and the settings they share."""

    models: tuple[Literal["dlrm", "lightgbm"], ...] = Field(("dlrm", "lightgbm"), min_length=1, description="Ranker models.")
    variants: tuple[str, ...] = Field(VARIANTS, min_length=1, description="Ranker variants.")
    valid_fraction: float = Field(_RANKER.valid_fraction, ge=0, lt=1, description="The latest part of the training window that picks the epoch / iteration.")
    features: FeatureConfig = Field(default_factory=FeatureConfig, description="ranker.features.FeatureConfig")
    dlrm: DLRMConfig = Field(default_factory=DLRMConfig, description="ranker.dlrm.DLRMConfig")
    lightgbm: LightGBMConfig = Field(default_factory=LightGBMConfig, description="ranker.gbdt.LightGBMConfig")

    def __post_init__(self) -> None:
        for variant in self.variants:
            variant_parts(variant)

    def ranker_config(self, model: str, variant: str) -> RankerConfig:
        """The RankerConfig of one model and variant."""
        return RankerConfig(model=model, variant=variant, valid_fraction=self.valid_fraction, features=self.features,
                            dlrm=self.dlrm, lightgbm=self.lightgbm)


@config_class
class RetrievalABSettings:
    """The retrieval A/B of a simulator run (pipelines/steps/retrieval.py; the report's retrieval section)."""

    enabled: bool = Field(True, description="Run it on simulator data (other data has no true relevance of unshown items: skipped).")
    requests: int = Field(1000, ge=1, description="Test requests sampled (seeded).")
    added: int = Field(20, ge=1, description="Candidates each retriever adds to a logged slate.")
    beam: int = Field(20, ge=1, description="Beam width of the LM's search.")
    # torch by default: the step runs in the run's own process (the embed step starts vLLM in a subprocess of its own)
    engine: Literal["vllm", "torch"] = Field("torch", description="Retrieval engine of the A/B (vllm: the production path, slower to start).")


@config_class
class FeatureStoreSettings:
    """The run's Feast repo (feature_store.repo.OfflineStoreConfig); every engine gives the same training rows, so changing
    it redoes nothing."""

    offline_store: Literal["file", "duckdb", "ray"] = Field(
        "duckdb", description="Engine of the point-in-time training-set joins and of materialization (docs/feature-store.md#engines); "
                              "duckdb: 2.5x the file store's rows/s at 1M rows (benchmarks/bench_offline_join.py).")
    ray_address: str | None = Field(None, description="ray: HOST:PORT of a running Ray cluster (default: a local Ray started by the run).")
    ray_cpus: int | None = Field(None, ge=1, description="ray without ray_address: CPU slots of the local Ray (default: every core).")

    def __post_init__(self) -> None:
        from feature_store.repo import FeatureStoreError

        try:  # a ray setting beside another engine, or both ray settings: refused when the config loads, not ignored
            self.offline()
        except FeatureStoreError as exc:
            raise ValueError(str(exc)) from None

    def offline(self) -> Any:
        from feature_store.repo import OfflineStoreConfig

        return OfflineStoreConfig(self.offline_store, ray_address=self.ray_address, ray_cpus=self.ray_cpus)


@config_class
class TrackingSettings:
    """Experiment tracking of a finished run (pipelines/run/tracking.py); nothing is tracked (nor mlflow imported)
    unless `mlflow` is set."""

    mlflow: str | None = Field(None, description="MLflow tracking URI (file:///srv/mlruns, http://host:5000): log the run's settings, "
                                                 "every ranker's and LM's metrics and the report there at the end of `lum run`.")
    experiment: str = Field("lum", min_length=1, description="The MLflow experiment the run is logged under.")


@config_class
class RunConfig:
    """A whole run, data to report."""

    run_dir: str = Field("runs/demo", description="The run folder (every step's output).")
    data: DataConfig = Field(default_factory=DataConfig, description="Where the events come from.")
    protocols: tuple[ProtocolConfig, ...] = Field((ProtocolConfig(),), min_length=1,
                                                  description="Evaluation protocols (distinct splits, or one split with two feature modes).")
    lm: LMConfig = Field(default_factory=LMConfig, description="The behaviour LM.")
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="The embedding step.")
    rankers: RankersConfig = Field(default_factory=RankersConfig, description="The rankers.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="pipelines.report.spec.ReportConfig")
    retrieval: RetrievalABSettings = Field(default_factory=RetrievalABSettings, description="The retrieval A/B (simulator runs).")
    features: FeatureStoreSettings = Field(default_factory=FeatureStoreSettings, description="The feature store's engine.")
    targets: dict[str, float | bool] = Field(default_factory=dict, description="Lift targets the report checks.")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="Experiment tracking (MLflow).")
    seeds: int = Field(1, ge=1, le=20, description="Train the LM and the rankers with this many seeds (seed k in run_dir/seeds/seed-k); "
                                                   "the report adds the lifts across seeds (pipelines.run.subruns).")
    holdout: Literal["test", "validation"] = Field(
        "test", description="test: score the test window; validation: cut the test window off the log and run on the rest in "
                            "run_dir/validation, its validation window in place of the test window (for choosing settings).")
    validation_share: float = Field(0.5, gt=0, lt=1, description="holdout validation: the latest share of the ranker-training window "
                                                                 "that is the validation window.")

    def __post_init__(self) -> None:
        if self.holdout == "validation" and len({(p.split, p.fractions, p.last_k) for p in self.protocols}) > 1:
            raise ValueError("holdout: validation cuts one test window off the log: every protocol must have the same split and fractions")
        seen: dict[str, ProtocolConfig] = {}
        for p in self.protocols:
            first = seen.setdefault(p.split, p)
            if first is p:
                continue
            # one LM per split: protocols sharing a split share its windows and LM and differ in their LUM features
            if p.features == first.features:
                raise ValueError(f"two protocols on split {p.split} with the same features ({p.features}): give them distinct splits or feature modes")
            if (p.fractions, p.last_k) != (first.fractions, first.last_k):
                raise ValueError(f"protocols on split {p.split} must have the same fractions and last_k "
                                 f"(got {first.fractions}, {first.last_k} and {p.fractions}, {p.last_k})")

    def protocol_key(self, protocol: ProtocolConfig) -> str:
        """Where a protocol's outputs live (pipelines.paths): its split, or `split@features` for the second protocol on
        a split (the first on a split is its headline: the main feature repo, and the online store's source)."""
        first = next(p for p in self.protocols if p.split == protocol.split)
        return protocol.split if first == protocol else f"{protocol.split}@{protocol.features}"


# --------------------------------------------------------------------------------------------------------- loading
def _sections(cls: type, where: str = "") -> dict[str, list[str]]:
    """field name -> the dotted sections of the config tree that have it (to point a misplaced key home)."""
    out: dict[str, list[str]] = {}
    for name, info in cls.__pydantic_fields__.items():
        out.setdefault(name, []).append(where or "(top level)")
        kind = info.annotation
        if isinstance(kind, type) and is_dataclass(kind):
            for key, places in _sections(kind, f"{where}.{name}" if where else name).items():
                out.setdefault(key, []).extend(places)
    return out


def _describe(error: dict[str, Any], homes: dict[str, list[str]]) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "unexpected_keyword_argument":
        key = str(error["loc"][-1])
        close = difflib.get_close_matches(key, list(homes), n=1)
        hint = f"; `{key}` is a key of {', '.join(homes[key])}" if key in homes else (f"; did you mean `{close[0]}`?" if close else "")
        return f"{loc}: unknown key{hint}"
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list, tuple)) else f" (got {value!r})"
    return f"{loc}: {error['msg']}{shown}"


def parse_run_config(data: Any, where: str = "config") -> RunConfig:
    """A validated RunConfig from a mapping (a parsed YAML file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a run config must be a mapping (see `lum run --help`)")
    try:
        return TypeAdapter(RunConfig).validate_python(data)
    except ValidationError as exc:
        homes = _sections(RunConfig)
        problems = "\n  ".join(_describe(e, homes) for e in exc.errors())
        raise ConfigError(f"{where}: invalid run config:\n  {problems}") from None


# the path-typed settings of a run config: relative paths in a config file are relative to the file's folder
PATH_KEYS = ("run_dir", "data.path", "data.items")


def resolve_path(value: str, base: Path) -> str:
    """`value` (a path written in a config file) resolved against the file's folder `base`: absolute paths (and
    `~`) stay; a relative one is joined to `base` and spelled relative to the working directory. That spelling is
    what the steps record (`data.path`, the run folder's paths), and the one earlier versions recorded when the
    configs' paths were relative to the working directory: a run made from the repository root resumes unchanged."""
    given = Path(value).expanduser()
    if given.is_absolute():
        return str(given)
    return os.path.relpath(os.path.abspath(base / given))


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Resolve the PATH_KEYS a config file sets (in place) against its folder `base`."""
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        node: Any = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(name), str) and node[name].strip():
            node[name] = resolve_path(node[name], base)


EXTENDS_KEY = "extends"
MAX_EXTENDS = 8  # a chain of bases deeper than this is a mistake (or a cycle the check below did not name)


def _merged(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` over `base`: mappings merge key by key, anything else (a list, a value) replaces the base's."""
    out = dict(base)
    for key, value in child.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping, its relative paths resolved against its folder, merged over the file it
    `extends` (relative to its folder; that one's paths against its own folder), recursively."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read run config {path}: {exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping (see `lum run --help`)")
    _resolve_paths(data, path.parent)
    base = data.pop(EXTENDS_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' must name another run config file, e.g. extends: demo.yaml")
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve() or len(chain) >= MAX_EXTENDS:
        raise ConfigError(f"{path}: '{EXTENDS_KEY}: {base}' makes a cycle (or a chain over {MAX_EXTENDS} files): "
                          + " -> ".join(str(p) for p in (*chain, path.resolve(), base_path)))
    if not base_path.is_file():
        raise ConfigError(f"{path}: '{EXTENDS_KEY}: {base}' names no file ({base_path})")
    return _merged(_read_config_file(base_path, (*chain, path.resolve())), data)


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run config of a YAML file (None: every default), with dotted-key overrides (`run_dir`, `lm.pretrain.epochs`).

    Relative paths in the file (PATH_KEYS: `run_dir`, `data.path`, `data.items`) are relative to the file's folder,
    wherever `lum run` is started; those of `overrides` (the command line's `--run`, `--set`) to the working directory.
    A file may start from another one: `extends: demo.yaml` (relative to its folder) takes that file's settings and
    changes what this one sets (sections merge key by key; a list or a value replaces the base's).
    """
    data = _read_config_file(Path(path)) if path else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *sections, name = key.split(".")
        node = data
        for depth, section in enumerate(sections):
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path or 'config'}: cannot set {key}: {'.'.join(sections[:depth + 1])} is not a section")
        node[name] = value
    return parse_run_config(data, str(path or "config"))


def config_dict(config: Any) -> Any:
    """A config (or a tuple or list of them, or plain values) as plain JSON values (tuples as lists)."""
    if isinstance(config, (tuple, list)):
        return [config_dict(part) for part in config]
    return json.loads(json.dumps(asdict(config) if is_dataclass(config) else config, default=str))


def settings_hash(*parts: Any) -> str:
    """A short stable hash of settings (configs or plain values), for `run_state.json` and `lum status`."""
    return hashlib.sha256(json.dumps(config_dict(parts), sort_keys=True).encode()).hexdigest()[:12]
