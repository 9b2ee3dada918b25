"""A SASRec-style baseline for next-item evaluation (Kang & McAuley 2018): causal self-attention over item ids.

No conditions, no content: an item embedding per item of the training window (tied with the output layer), learned
positions, pre-norm transformer blocks with a causal mask, and a full softmax over the training window's items at
every position (the cross-entropy form later papers train SASRec with). It is trained on the same window as the
behaviour LM, so it can only rank items seen there.

Stopping point: the last behaviour of each training user is held out as a validation target (the rest trains);
the epoch with the best validation NDCG@10 is kept (patience `patience` epochs). The test window is never seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lum.config import SasRecConfig


class SasRec(nn.Module):
    def __init__(self, n_items: int, config: SasRecConfig):
        super().__init__()
        self.config = config
        self.items = nn.Embedding(n_items + 1, config.hidden_size, padding_idx=0)  # index 0: padding
        self.positions = nn.Embedding(config.max_len, config.hidden_size)
        block = nn.TransformerEncoderLayer(config.hidden_size, config.heads, 2 * config.hidden_size, config.dropout,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] right-aligned item indices (0 = padding) -> hidden states [B, T, H]."""
        T = ids.shape[1]
        x = self.items(ids) * self.config.hidden_size**0.5 + self.positions(torch.arange(T))[None]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        x = self.blocks(self.dropout(x), mask=causal, src_key_padding_mask=None)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., n_items] scores of the real items (padding excluded)."""
        return hidden @ self.items.weight[1:].T


@dataclass
class TrainedSasRec:
    model: SasRec
    item_ids: np.ndarray  # [n_items] item id of each index - 1
    best_epoch: int
    validation_ndcg10: float

    @torch.no_grad()
    def top_items(self, histories: list[list[str]], n: int, batch_size: int = 256) -> np.ndarray:
        """[U, n] the n best items after each history (oldest first), unknown history items skipped."""
        self.model.eval()
        index = {item: i + 1 for i, item in enumerate(self.item_ids)}
        L = self.model.config.max_len
        out = []
        for start in range(0, len(histories), batch_size):
            rows = [[index[i] for i in h if i in index][-L:] for h in histories[start : start + batch_size]]
            ids = torch.zeros(len(rows), L, dtype=torch.long)
            for r, row in enumerate(rows):
                if row:
                    ids[r, L - len(row) :] = torch.as_tensor(row)
            scores = self.model.logits(self.model(ids)[:, -1])  # [B, n_items]
            out.append(torch.topk(scores, min(n, scores.shape[1]), dim=1).indices.numpy())
        return self.item_ids[np.concatenate(out)] if out else np.zeros((0, n), dtype=object)


def _segments(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """[S, max_len + 1] the last max_len + 1 items of each sequence, right-aligned and 0-padded (SASRec trains on the
    most recent actions only): inputs are [:, :-1], targets [:, 1:]."""
    rows = [np.concatenate([np.zeros(max_len + 1 - len(w), np.int64), w]) for w in (seq[-(max_len + 1) :] for seq in sequences)]
    return np.stack(rows) if rows else np.zeros((0, max_len + 1), np.int64)


def train_sasrec(behaviours: pd.DataFrame, config: SasRecConfig = SasRecConfig()) -> TrainedSasRec:
    """Train on the behaviours (user_id, item_id, ts) of one window; stop on the held-out last behaviours."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    frame = behaviours.sort_values(["user_id", "ts"], kind="stable")
    item_ids = np.array(sorted(frame["item_id"].astype(str).unique()), dtype=object)
    if len(item_ids) < 2:
        raise ValueError("the SASRec baseline needs at least two items in its training window")
    index = pd.Series(np.arange(1, len(item_ids) + 1), index=item_ids)
    coded = index[frame["item_id"].astype(str)].to_numpy()
    users = frame["user_id"].to_numpy()
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    sequences = [coded[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= 2]
    train = _segments([s[:-1] for s in sequences], config.max_len)
    val_inputs = [s[:-1][-config.max_len :] for s in sequences]
    val_targets = np.array([s[-1] for s in sequences])
    model = SasRec(len(item_ids), config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98))
    best, best_state, best_epoch, stale = -1.0, None, 0, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(len(train))
        for start in range(0, len(train), config.batch_size):
            batch = torch.from_numpy(train[order[start : start + config.batch_size]])
            inputs, targets = batch[:, :-1], batch[:, 1:]
            where = targets > 0
            hidden = model(inputs)[where]  # [P, H]
            loss = F.cross_entropy(model.logits(hidden), targets[where] - 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ndcg = _validation_ndcg(model, val_inputs, val_targets, config.max_len)
        if ndcg > best:
            best, best_epoch, stale = ndcg, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale > config.patience:
                break
    model.load_state_dict(best_state)
    return TrainedSasRec(model.eval(), item_ids, best_epoch, best)


@torch.no_grad()
def _validation_ndcg(model: SasRec, inputs: list[np.ndarray], targets: np.ndarray, max_len: int, k: int = 10) -> float:
    model.eval()
    gains = []
    for start in range(0, len(inputs), 256):
        rows = inputs[start : start + 256]
        ids = torch.zeros(len(rows), max_len, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, max_len - len(row) :] = torch.as_tensor(row)
        scores = model.logits(model(ids)[:, -1])
        target = torch.as_tensor(targets[start : start + 256] - 1)
        rank = (scores > scores.gather(1, target[:, None])).sum(1).numpy()
        gains.append(np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0))
    return float(np.concatenate(gains).mean()) if gains else 0.0
