"""Next-item evaluation of the behaviour LM: HR@k and NDCG@k, leave-last-out, full ranking over items.

For every user with a behaviour in the test window, the target is their last behaviour there; the prompt is
[BOS] + their last `max_history` behaviours strictly before it (any window) + the target's condition token, and
the model ranks every item token by the dot product of the hidden state at that condition token with the
item's output row. A target item without a token of its own (too rare in the pretraining window, or new) can
only be missed: the share of such targets is reported. Two baselines rank the same targets:

* popularity: the most frequent items of the history events, the same list for everybody;
* recent: the user's most recent distinct items, most recent first, filled up with popular items.

Metrics are reported overall and per target condition.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from contracts.progress import bars_off
from lum.config import EvalConfig  # noqa: F401  (re-exported)
from lum.tokenizer import PAD, BehaviourTokenizer


def _metrics(ranks: np.ndarray, k: int) -> dict[str, float]:
    """`ranks` [U]: 0-based rank of each target (large = not ranked)."""
    hit = ranks < k
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())}


def _rank_in_lists(lists: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[U, k] recommended item ids, [U] targets -> [U] rank of the target (k when absent)."""
    match = lists == targets[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), lists.shape[1])


def leave_last_out(tokenizer: BehaviourTokenizer, history: pd.DataFrame, test: pd.DataFrame, config: EvalConfig) -> pd.DataFrame:
    """One row per evaluated user: their target behaviour and all behaviours strictly before it."""
    test_beh = tokenizer.behaviours(test)
    targets = test_beh.groupby("user_id", sort=True).tail(1)
    if config.max_users is not None and len(targets) > config.max_users:
        targets = targets.sample(config.max_users, random_state=config.seed).sort_values("user_id")
    return targets.reset_index(drop=True)


def behaviours_before_targets(tokenizer: BehaviourTokenizer, all_events: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    """Each evaluated user's behaviours strictly before their target's time (what model and baselines may see)."""
    behaviours = tokenizer.behaviours(all_events)
    cut = targets.set_index("user_id")["ts"]
    return behaviours[behaviours["ts"] < behaviours["user_id"].map(cut)]


@torch.no_grad()
def score_model(
    model: LlamaForCausalLM,
    tokenizer: BehaviourTokenizer,
    all_events: pd.DataFrame,
    targets: pd.DataFrame,
    config: EvalConfig,
    progress: bool = False,
) -> np.ndarray:
    """[U] rank of each target item among all item tokens; histories are the behaviours before each target."""
    item_tokens = tokenizer.item_token_ids()
    head = model.lm_head.weight[torch.as_tensor(item_tokens)]  # [V_items, H]
    target_tok = tokenizer.item_ids(targets["item_id"])[:, 0]
    cond_tok = tokenizer.condition_ids(targets)
    position_of = {t: i for i, t in enumerate(item_tokens)}
    target_pos = np.array([position_of.get(int(t), -1) for t in target_tok])
    # histories strictly before each target's time
    before = behaviours_before_targets(tokenizer, all_events, targets)
    histories = tokenizer.encode_histories(before)
    ranks = np.full(len(targets), np.iinfo(np.int64).max // 2, dtype=np.int64)
    users = targets["user_id"].astype(str).to_numpy()
    for start in tqdm(range(0, len(targets), config.batch_size), disable=bars_off(progress), desc="evaluating"):
        idx = np.arange(start, min(start + config.batch_size, len(targets)))
        prompts = [np.append(histories.get(users[i], np.array([1])), cond_tok[i]) for i in idx]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(idx), width), PAD, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.as_tensor(p)
        mask = (torch.arange(width)[None, :] < torch.tensor([len(p) for p in prompts])[:, None]).long()
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [B, T, H]
        last = hidden[torch.arange(len(idx)), mask.sum(1) - 1]  # [B, H]
        scores = last @ head.T  # [B, V_items]
        for r, i in enumerate(idx):
            if target_pos[i] >= 0:
                ranks[i] = int((scores[r] > scores[r, target_pos[i]]).sum())
    return ranks


def baseline_ranks(
    tokenizer: BehaviourTokenizer, history_events: pd.DataFrame, all_events: pd.DataFrame, targets: pd.DataFrame, k: int
) -> dict[str, np.ndarray]:
    """Ranks of the targets in the popularity list (from `history_events`) and in each user's recent items."""
    popular = tokenizer.behaviours(history_events)["item_id"].astype(str).value_counts().index.to_numpy()[: 2 * k]
    target_items = targets["item_id"].astype(str).to_numpy()
    pop_lists = np.tile(popular[:k], (len(targets), 1))
    before = behaviours_before_targets(tokenizer, all_events, targets)
    recent_by_user = before.groupby("user_id", sort=False)["item_id"].apply(lambda s: list(dict.fromkeys(s.astype(str).to_numpy()[::-1]))[:k])
    recent_lists = []
    for user in targets["user_id"]:
        recent = recent_by_user.get(user, [])
        fill = [p for p in popular if p not in recent]
        recent_lists.append((recent + fill)[:k])
    return {
        "popularity": _rank_in_lists(pop_lists, target_items),
        "recent": _rank_in_lists(np.array(recent_lists, dtype=object), target_items),
    }


def evaluate_next_item(
    model: LlamaForCausalLM,
    tokenizer: BehaviourTokenizer,
    events_before: pd.DataFrame,
    test: pd.DataFrame,
    config: EvalConfig = EvalConfig(),
    progress: bool = False,
) -> dict[str, Any]:
    """HR@k / NDCG@k of the model and both baselines, overall and per target condition."""
    if tokenizer.config.item_tokenization != "id":
        raise ValueError(
            "next-item evaluation ranks item tokens and supports id item tokenization only; a semantic-ID model "
            "would need a beam search over code sequences (not implemented)"
        )
    model.eval()
    targets = leave_last_out(tokenizer, events_before, test, config)
    if targets.empty:
        raise ValueError("the test window holds no behaviours to evaluate")
    all_events = pd.concat([events_before, test], ignore_index=True)
    ranks = {"model": score_model(model, tokenizer, all_events, targets, config, progress)}
    ranks.update(baseline_ranks(tokenizer, events_before, all_events, targets, config.k))
    condition = tokenizer.condition_ids(targets)
    condition_name = np.array([tokenizer.vocab[c] for c in condition])
    target_tok = tokenizer.item_ids(targets["item_id"])[:, 0]
    out: dict[str, Any] = {
        "users": int(len(targets)),
        "k": config.k,
        "target_without_item_token": float(np.mean(~np.isin(target_tok, tokenizer.item_token_ids()))),
        "overall": {name: _metrics(r, config.k) for name, r in ranks.items()},
        "per_condition": {},
    }
    for value in np.unique(condition_name):
        sel = condition_name == value
        out["per_condition"][value] = {"users": int(sel.sum()), **{name: _metrics(r[sel], config.k) for name, r in ranks.items()}}
    return out


def format_evaluation(result: dict[str, Any]) -> str:
    k = result["k"]
    rows = {name: m for name, m in result["overall"].items()}
    frame = pd.DataFrame(rows).T[[f"hr@{k}", f"ndcg@{k}"]].map(lambda v: f"{v:.4f}")
    lines = [f"{result['users']} users, targets without an item token: {result['target_without_item_token']:.1%}", frame.to_string()]
    per = {
        (cond, name): values[f"hr@{k}"]
        for cond, metrics in result["per_condition"].items()
        for name, values in metrics.items()
        if name != "users"
    }
    if per:
        table = pd.Series(per).unstack().map(lambda v: f"{v:.4f}")
        table.insert(0, "users", [result["per_condition"][c]["users"] for c in table.index])
        lines += [f"HR@{k} per condition:", table.to_string()]
    return "\n".join(lines)
