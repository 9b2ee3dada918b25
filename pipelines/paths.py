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
      training_sets/<protocol>-<window>-<service>.parquet   point-in-time training sets built through Feast
      (later steps add rankers/, report/)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
        return self.root / "splits" / protocol

    def split_file(self, protocol: str, window: str) -> Path:
        return self.split_dir(protocol) / f"{window}.parquet"

    def split_summary(self, protocol: str) -> Path:
        return self.split_dir(protocol) / "summary.json"

    def model_dir(self, protocol: str, preset: str) -> Path:
        return self.root / "models" / f"{protocol}-{preset}"

    def evaluation(self, protocol: str, preset: str) -> Path:
        return self.root / "evaluations" / f"{protocol}-{preset}.json"

    def embeddings(self, name: str) -> Path:
        return self.root / "embeddings" / name

    @property
    def feature_repo(self) -> Path:
        return self.root / "feature_repo"

    def training_set(self, protocol: str, window: str, service: str) -> Path:
        return self.root / "training_sets" / f"{protocol}-{window}-{service}.parquet"
