"""Rankers that consume the feature store's training set (LUM step 3, "knowledge utilization").

    schema.py      the training-set contract: FeatureSchema, variants, input checks (RankerInputError)
    features.py    table -> DLRM inputs (KeyedJaggedTensor + dense) or LightGBM's matrix; LUM interest matching
    dlrm.py        torchrec DLRM trained through DistributedModelParallel (fused row-wise Adagrad + Adam)
    gbdt.py        LightGBM binary classifier
    train.py       train_ranker(table, RankerConfig) -> TrainedRanker (save / load / score); time-based validation
    train_dist.py  `torchrun --nproc_per_node=N -m ranker.train_dist ...`
    metrics.py     AUC, GAUC, logloss, NE, calibration, RelaImpr, per-slice tables, paired bootstrap over users

This package imports neither `lum` nor `feature_store`: it meets them through the training-set table, whose column
names, condition slugs and variant names it shares with the feature store through `contracts.names`.
"""
