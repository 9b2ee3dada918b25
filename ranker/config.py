"""Every setting of the rankers, in one light module: features, DLRM, LightGBM, and one ranker's choice of them.

The CLI builds `lum ranker train`'s options from these dataclasses and a run config's `rankers:` section is made of
them (see contracts/settings.py), so this is the one place a ranker default is defined. Kept free of torch,
TorchRec and LightGBM so that reading a config or `lum --help` stays fast.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from contracts.settings import Field, config_class, from_saved
from contracts.threads import default_threads
from ranker.schema import variant_parts

METRICS = ("auc", "binary_logloss")  # LightGBM's names; both are recorded on the validation rows


@config_class
class FeatureConfig:
    """Which inputs a ranker gets from a training-set row (both models read the same pipeline)."""

    history_len: int = Field(50, ge=1, description="Most recent history items pooled (the column is newest last).")
    min_count: int = Field(1, ge=1, description="Values seen fewer times in the fitting rows share the OOV id.")
    max_vocab: int | None = Field(None, ge=1, description="Keep only the most frequent values of each vocabulary.")
    # "scores" by default: as good as the vectors on the demo, in a fifth of the time (docs/history.md)
    lum_inputs: Literal["scores", "vectors"] = Field(
        "scores", description="LUM inputs: the similarities and cosines only, or also the user and item vectors themselves.")
    # off by default: a tree splits a many-level id into memorised groups; the counters carry what an id knows
    lightgbm_ids: bool = Field(False, description="LightGBM: also use the raw user and item ids as categorical features.")
    # on by default, the DLRM as published; the demo turns it off, its id tables memorise within an epoch (docs/history.md)
    dlrm_ids: bool = Field(True, description="DLRM: embed the raw user and item ids (off: they reach it only through counters, context and history).")
    # off by default: the published din+lum figures (2026-12-07) were measured without it; see docs/rankers.md
    din_lm_similarity: bool = Field(
        False, description="LightGBM din+lum: also the behaviours' cosines to the candidate through the LM's item vectors.")
    # a pointwise model cannot compare rows; off by default since it needs every candidate of a request scored together
    request_features: bool = Field(
        False, description="Also each candidate's scores relative to the other candidates of its request (same user and time).")


@config_class
class DLRMConfig:
    """The TorchRec DLRM and how it is trained."""

    embedding_dim: int = Field(32, ge=1, description="DLRM table dimension D.")
    dense_arch_layers: tuple[int, ...] = Field((256, 128), description="Dense arch layer sizes (then D: DLRM projects the dense input to D).")
    over_arch_layers: tuple[int, ...] = Field((256, 128), description="Over arch layer sizes (then 1: the logit).")
    interaction: Literal["dot", "dcn"] = Field("dot", description="DLRM's pairwise dot products, or DLRM_DCN's low-rank cross net.")
    dcn_layers: int = Field(3, ge=1, description="dcn: cross layers.")
    dcn_low_rank: int = Field(64, ge=1, description="dcn: low-rank dimension.")
    # the din variants' target attention (ranker/din.py); DIN's own MLP is 80-40 over its [q, k, q-k, q*k] input
    attention_hidden: tuple[int, ...] = Field((80, 40), description="din: hidden sizes of the attention MLP.")
    attention_softmax: bool = Field(False, description="din: softmax-normalise the weights (off: DIN's unnormalised weights).")
    age_dim: int = Field(8, ge=0, description="din: size of the behaviour-age embedding in the attention input (0: no age).")
    batch_size: int = Field(2048, ge=1, description="Global batch (under torchrun every rank takes batch_size / world rows).")
    epochs: int = Field(5, ge=1, description="Most epochs (early stopping on the latest part of the training window).")
    patience: int = Field(2, ge=0, description="Validations without a better AUC before stopping.")
    # more than one lets the model be kept from the middle of an epoch, before id tables overfit
    evals_per_epoch: int = Field(1, ge=1, description="Validations per epoch, at equal shares of its batches; the best one is kept.")
    # 0 by default: on the demo it barely moved CTR@10 and cost GAUC (docs/history.md); > 0 batches whole requests
    listwise_weight: float = Field(0.0, ge=0, description="Weight of a listwise loss over each request's candidates, added to the log loss.")
    dense_lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate of the dense part.")
    embedding_lr: float = Field(0.05, gt=0, le=1, description="Row-wise Adagrad learning rate of the tables.")
    embedding_eps: float = Field(1e-8, gt=0, description="Row-wise Adagrad epsilon.")
    engine: Literal["dmp", "plain"] = Field("dmp", description="dmp: TorchRec DistributedModelParallel (fused tables); plain: an unsharded module.")
    eval_batch_size: int = Field(16_384, ge=1, description="Rows per scoring batch.")
    seed: int = Field(0, description="Random seed (weights, batch order).")
    threads: int | None = Field(None, ge=1, description="Torch intra-op threads (default: the CPUs this process may use, or OMP_NUM_THREADS).")


@config_class
class LightGBMConfig:
    """LightGBM's parameters for the binary ranker."""

    num_leaves: int = Field(63, ge=2, description="LightGBM num_leaves.")
    learning_rate: float = Field(0.05, gt=0, le=1, description="LightGBM learning rate.")
    n_estimators: int = Field(1000, ge=1, description="Most trees (early stopping picks the iteration).")
    early_stopping_rounds: int = Field(50, ge=1, description="Trees without a better validation metric before stopping.")
    min_data_in_leaf: int = Field(50, ge=1, description="LightGBM min_data_in_leaf.")
    feature_fraction: float = Field(0.8, gt=0, le=1, description="LightGBM feature_fraction.")
    bagging_fraction: float = Field(0.8, gt=0, le=1, description="LightGBM bagging_fraction.")
    bagging_freq: int = Field(1, ge=0, description="LightGBM bagging_freq.")
    lambda_l2: float = Field(1.0, ge=0, description="LightGBM lambda_l2.")
    cat_smooth: float = Field(10.0, ge=0, description="LightGBM cat_smooth.")
    max_cat_threshold: int = Field(64, ge=1, description="LightGBM max_cat_threshold.")
    seed: int = Field(0, description="Random seed.")
    threads: int | None = Field(None, ge=1, description="LightGBM threads (default: the CPUs this process may use, or OMP_NUM_THREADS).")
    # on a small validation window AUC can peak by chance in the first trees; the logloss moves smoothly
    early_stopping_metric: Literal["auc", "binary_logloss"] = Field(
        "auc", description="The validation metric whose best iteration is kept.")

    def params(self) -> dict:
        params = {
            "objective": "binary",
            # the first one decides the early stop (first_metric_only); the other is recorded
            "metric": [self.early_stopping_metric, *(m for m in METRICS if m != self.early_stopping_metric)],
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "lambda_l2": self.lambda_l2,
            "cat_smooth": self.cat_smooth,
            "max_cat_threshold": self.max_cat_threshold,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }
        # LightGBM's own default is OpenMP's: the host's cores, not the cgroup quota this process may use
        params["num_threads"] = self.threads or default_threads()
        return params


@config_class
class RankerConfig:
    """One ranker: its model, its variant (which LUM / history inputs), and the settings of its parts."""

    model: Literal["dlrm", "lightgbm"] = Field("dlrm", description="The ranker model.")
    variant: str = Field("base", description="Inputs: base | lum | pooled-history | lum+pooled | din | din+lum.")
    # by time, not random rows: random rows share users and moments with the fitting rows and reward memorising ids
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="The latest part of the training window, by time, that picks the epoch / iteration.")
    features: FeatureConfig = Field(default_factory=FeatureConfig, description="Inputs built from a training-set row.")
    dlrm: DLRMConfig = Field(default_factory=DLRMConfig, description="DLRM settings.")
    lightgbm: LightGBMConfig = Field(default_factory=LightGBMConfig, description="LightGBM settings.")

    def __post_init__(self) -> None:
        variant_parts(self.variant)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankerConfig:
        return from_saved(cls, data)
