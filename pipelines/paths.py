"""The run folder: the one place that says where each step reads and writes.

    runs/<name>/
      data/
        events.parquet              the validated event log (contract in its schema metadata)
        items.parquet               the items table (item_id + content columns), when the source has one
        events.quarantine.parquet   rows set aside by --on-bad quarantine, each with its reason
        dataset.json                source, parameters, contract, coercions, counts
      splits/<protocol>/
        pretrain.parquet            events the behaviour LM may be pretrained on
        train.parquet               ranker-training rows
        test.parquet                ranker-test rows
        summary.json                per-window users, items, events, positive rate, time range, cold-row share
      models/<protocol>-<preset>/   the behaviour LM: HF checkpoint, tokenizer, lum_manifest.json, training_log.json
                                    (assembled in models/<protocol>-<preset>.partial/ with its checkpoint)
      evaluations/<protocol>-<preset>.json   next-item HR@10 / NDCG@10 of the model and its baselines
      embeddings/<name>/            output of `lum embed` (users/ shards, items.parquet, manifest.json)
      feature_repo/                 the Feast repo (feature_store.yaml, definitions.py, lum_features.yaml, data/)
      feature_repo@<features>/      the repo of a second protocol on the same split (another feature mode, same LM)
      training_sets/<protocol>-<window>-<service>.parquet   point-in-time training sets built through Feast
      (later steps add rankers/, report/)

A protocol key names a split (`global`, `per-user`), optionally followed by `@<feature mode>` when a second
protocol of the run uses the same split with other LUM features (`global@rolling`): its split and LM are the
split's, its feature repo, training sets, rankers and scores its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def split_of(protocol: str) -> str:
    """The split of a protocol key (`global@rolling` -> `global`)."""
    return protocol.split("@", 1)[0]


def feature_mode_of(protocol: str) -> str | None:
    """The feature mode of a secondary protocol key (`global@rolling` -> `rolling`), None for a plain split."""
    return protocol.split("@", 1)[1] if "@" in protocol else None


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def events(self) -> Path:
        return self.data_dir / "events.parquet"

    @property
    def items(self) -> Path:
        return self.data_dir / "items.parquet"

    @property
    def quarantine(self) -> Path:
        return self.data_dir / "events.quarantine.parquet"

    @property
    def dataset_info(self) -> Path:
        return self.data_dir / "dataset.json"

    def split_dir(self, protocol: str) -> Path:
        return self.root / "splits" / split_of(protocol)

    def split_file(self, protocol: str, window: str) -> Path:
        return self.split_dir(protocol) / f"{window}.parquet"

    def split_summary(self, protocol: str) -> Path:
        return self.split_dir(protocol) / "summary.json"

    def model_dir(self, protocol: str, preset: str) -> Path:
        return self.root / "models" / f"{split_of(protocol)}-{preset}"

    def evaluation(self, protocol: str, preset: str) -> Path:
        return self.root / "evaluations" / f"{split_of(protocol)}-{preset}.json"

    def retrieval_ab(self, split: str) -> Path:
        """The retrieval A/B of a simulator run's split (pipelines/steps/retrieval.py)."""
        return self.root / "retrieval" / f"{split_of(split)}.json"

    def embeddings(self, name: str) -> Path:
        return self.root / "embeddings" / name

    @property
    def feature_repo(self) -> Path:
        """The run's main Feast repo: what `lum features`, `lum serve` and the online store use."""
        return self.root / "feature_repo"

    def feature_repo_of(self, protocol: str | None) -> Path:
        """The Feast repo of a protocol key: the main one (also for None), or `feature_repo@<mode>` for a secondary protocol."""
        mode = feature_mode_of(protocol) if protocol else None
        return self.feature_repo if mode is None else self.root / f"feature_repo@{mode}"

    def training_set(self, protocol: str, window: str, service: str) -> Path:
        return self.root / "training_sets" / f"{protocol}-{window}-{service}.parquet"
