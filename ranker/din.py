"""Target attention over the user's recent behaviours (DIN, Zhou et al. 2018) beside TorchRec's DLRM.

Shapes: B rows, L history positions (padded to the longest history of the batch), D the table dimension,
E = 2D a behaviour's vector (its item's and its category's embeddings side by side), F the DLRM's pooled sparse
features.

A behaviour is an engaged item of the user's recent history. Its item and category are looked up in a TorchRec
`EmbeddingCollection` (per position, no pooling) whose two tables also embed the candidate's item and category: a
history item and the target item are the same vector. `TargetAttention` weighs every behaviour by an MLP over
[target, behaviour, target - behaviour, target * behaviour, age], where age is the bucketed time between the
behaviour and the request (time matters: a click an hour ago says more than one a month ago, as HSTU and TWIN
use it). DIN keeps the weights unnormalised (a user with many relevant behaviours gets a larger interest vector);
softmax is an option. Positions past a row's history length are masked: they never get weight.

`DINDLRM` is TorchRec's DLRM (its `SparseArch`, `DenseArch`, `InteractionArch` / `InteractionDCNArch` and
`OverArch`) with one more sparse feature in the interaction: the attended interest vector projected to D.

Its input stays the DLRM's (dense [B, F_dense], one KeyedJaggedTensor): the KJT holds the EmbeddingBagCollection's
keys, then the EmbeddingCollection's (`din_item`, `hist_item_ids`, `din_category`, `hist_categories`), then
`hist_age` (an age bucket id per history position), in that order, so `forward` splits it by key counts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection, KeyedJaggedTensor
from torchrec.models.dlrm import DenseArch, InteractionArch, InteractionDCNArch, OverArch, SparseArch
from torchrec.modules.crossnet import LowRankCrossNet

# KJT keys of the EmbeddingCollection (per-position lookups) and of the age buckets; the history keys are the
# training set's own column names
TARGET_ITEM_KEY = "din_item"
TARGET_CATEGORY_KEY = "din_category"
AGE_KEY = "hist_age"

# Age bucket edges in hours: bucket 1 is "under 1 hour", then up to a day, a week, a month, a quarter, a year;
# 0 is the padding bucket (never attended), and the last bucket holds everything older than a year.
AGE_EDGES_HOURS = (1.0, 3.0, 6.0, 12.0, 24.0, 48.0, 96.0, 168.0, 336.0, 720.0, 2160.0, 8760.0)
NUM_AGE_BUCKETS = len(AGE_EDGES_HOURS) + 2  # padding, then len(edges) + 1 intervals


def age_buckets(age_hours: np.ndarray) -> np.ndarray:
    """[n] hours between a behaviour and the request -> [n] int64 bucket ids in 1..NUM_AGE_BUCKETS - 1.

    A NaN age (the history has no time, e.g. a training set built before times were stored) gets the oldest
    bucket; a negative one (a clock skew) the newest. 0 stays the padding id.
    """
    ages = np.nan_to_num(np.asarray(age_hours, dtype=np.float64), nan=np.inf)
    return np.searchsorted(np.asarray(AGE_EDGES_HOURS), np.maximum(ages, 0.0), side="right").astype(np.int64) + 1


class TargetAttention(nn.Module):
    """DIN's activation unit: one weight per behaviour from its relation to the target.

    Args:
        dim: E, the size of a behaviour and target vector.
        hidden: the MLP's hidden sizes (DIN: 80, 40; its activation is Dice, here PReLU, Dice's
            data-independent form).
        age_dim: size of the age bucket embedding fed to the MLP (0: no age input).
        softmax: normalise the weights over the history (off: DIN's unnormalised weights).
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (80, 40), age_dim: int = 8, softmax: bool = False):
        super().__init__()
        self.softmax = softmax
        self.age = nn.Embedding(NUM_AGE_BUCKETS, age_dim, padding_idx=0) if age_dim > 0 else None
        layers: list[nn.Module] = []
        width = 4 * dim + age_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.PReLU(size)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, target: torch.Tensor, behaviours: torch.Tensor, ages: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            target: [B, E] the candidate's vector.
            behaviours: [B, L, E] the history's vectors, padded after each row's last position.
            ages: [B, L] int64 age bucket ids (0 at padding).
            lengths: [B] int64 true history lengths (<= L).
        Returns:
            interest [B, E] = sum_l w[b, l] * behaviours[b, l], and the weights w [B, L] (0 at padding).
        """
        steps = behaviours.shape[1]
        query = target.unsqueeze(1).expand(-1, steps, -1)  # [B, L, E]
        parts = [query, behaviours, query - behaviours, query * behaviours]
        if self.age is not None:
            parts.append(self.age(ages))
        features = torch.cat(parts, dim=-1)  # [B, L, 4E + age_dim]
        scores = self.mlp(features.reshape(-1, features.shape[-1])).view(features.shape[0], steps)  # [B, L]
        mask = torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
        if self.softmax:
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
            weights = torch.nan_to_num(weights, nan=0.0)  # an empty history: every position masked
        else:
            weights = scores * mask
        interest = torch.bmm(weights.unsqueeze(1), behaviours).squeeze(1)  # [B, E]
        return interest, weights


class DINDLRM(nn.Module):
    """TorchRec's DLRM whose interaction gets one more sparse feature: the target-attended behaviour interest.

    Args:
        embedding_bag_collection: the pooled single-valued features (user, context...), F of them, dimension D.
        embedding_collection: two tables, the items (keys din_item, hist_item_ids) and the categories (din_category,
            hist_categories), dimension D.
        dense_in_features: F_dense.
        dense_arch_layer_sizes: ending in D.
        over_arch_layer_sizes: ending in 1.
        attention: a TargetAttention over E = 2D.
        dcn_num_layers, dcn_low_rank_dim: DLRM_DCN's cross net instead of the dot interaction (None: dot).
        max_history: the most history positions a row has (the feature pipeline's history_len). Eager forward pads
            to the batch's longest history; an exported program, which cannot read a length from its data, pads to
            this (the padding is masked, so both give the same scores).
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        embedding_collection: EmbeddingCollection,
        dense_in_features: int,
        dense_arch_layer_sizes: list[int],
        over_arch_layer_sizes: list[int],
        attention: TargetAttention,
        dcn_num_layers: int | None = None,
        dcn_low_rank_dim: int = 64,
        max_history: int = 50,
    ):
        super().__init__()
        dim = dense_arch_layer_sizes[-1]
        self.max_history = max_history
        self.sparse_arch = SparseArch(embedding_bag_collection)
        self.sequence_arch = embedding_collection
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes)
        self.attention = attention
        self.interest_projection = nn.Linear(2 * dim, dim)
        self.bag_keys = [k for c in embedding_bag_collection.embedding_bag_configs() for k in c.feature_names]
        self.sequence_keys = [k for c in embedding_collection.embedding_configs() for k in c.feature_names]
        num_sparse = len(self.bag_keys) + 1  # the pooled features, then the interest vector
        if dcn_num_layers is None:
            self.inter_arch: nn.Module = InteractionArch(num_sparse_features=num_sparse)
            over_in = dim + (num_sparse + 1) * num_sparse // 2  # D + choose(F + 1, 2) pairwise dots
        else:
            crossnet = LowRankCrossNet(in_features=(num_sparse + 1) * dim, num_layers=dcn_num_layers, low_rank=dcn_low_rank_dim)
            self.inter_arch = InteractionDCNArch(num_sparse_features=num_sparse, crossnet=crossnet)
            over_in = (num_sparse + 1) * dim
        self.over_arch = OverArch(over_in, over_arch_layer_sizes)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """dense_features [B, F_dense], sparse_features (keys: bag keys, sequence keys, hist_age) -> logits [B, 1]."""
        bags, sequences, ages = sparse_features.split([len(self.bag_keys), len(self.sequence_keys), 1])
        embedded_dense = self.dense_arch(dense_features)  # [B, D]
        embedded_sparse = self.sparse_arch(bags)  # [B, F, D]
        looked_up = self.sequence_arch(sequences)  # key -> JaggedTensor of per-position vectors
        target = torch.cat([looked_up[TARGET_ITEM_KEY].values(), looked_up[TARGET_CATEGORY_KEY].values()], dim=1)  # [B, 2D]
        items, categories = looked_up["hist_item_ids"], looked_up["hist_categories"]
        lengths = items.lengths()
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            steps = self.max_history
        else:
            steps = max(int(lengths.max()) if lengths.numel() else 0, 1)
        behaviours = torch.cat([items.to_padded_dense(steps), categories.to_padded_dense(steps)], dim=2)  # [B, L, 2D]
        age_ids = ages["hist_age"].to_padded_dense(steps, padding_value=0)  # [B, L]
        interest, _ = self.attention(target, behaviours, age_ids, lengths)
        interest = self.interest_projection(interest).unsqueeze(1)  # [B, 1, D]
        concatenated = self.inter_arch(dense_features=embedded_dense, sparse_features=torch.cat([embedded_sparse, interest], dim=1))
        return self.over_arch(concatenated)
