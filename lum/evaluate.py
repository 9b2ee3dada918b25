"""Next-item evaluation of the behaviour LM: HR@k, NDCG@k and Recall@R, leave-last-out, the model retrieving.

For every user with a behaviour in the test window, the target is their last behaviour there; the prompt is
[BOS] + their last `max_history` behaviours strictly before it (any window) + a query condition token, and
the model generates its top R items through the retrieval search of lum/retrieve.py (semantic-id models: the
constrained beam search over code sequences; id models: the top item logits). The target is looked up in that
list. A target the model cannot generate (an id model's rare or new item, an item without content codes) can
only be missed: the share of such targets is reported. With one target per user, Recall@R is the hit rate at
depth R (TIGER's and HSTU's convention). Three baselines rank the same targets:

* popularity: the most frequent items of the history events, the same list for everybody;
* recent: the user's most recent distinct items, most recent first, filled up with popular items;
* sasrec: a SASRec-style model (lum/sasrec.py) trained on the LM's pretraining window, stopped on a validation
  split of that window (its last behaviour per user), never on the test window.

The query condition holds only what is known before the target (`EvalConfig.query`): by default the target's
request-time condition columns, and each column known only after the event (MovieLens' feedback level, derived from
the rating being predicted) at its most frequent value in the history events; or one fixed condition for every
target. The target's own condition token can reveal the answer, so its figure (`target_conditioned`) is only a
labelled extra. The baselines use no condition at all, so they never see more than the model.

Metrics are reported overall and per target condition.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from contracts.progress import bars_off
from lum.config import EvalConfig  # noqa: F401  (re-exported)
from lum.embed import QueryGroup
from lum.retrieve import ItemTrie, RetrievalEngine, TorchRetrievalEngine, beam_search
from lum.tokenizer import BOS, BehaviourTokenizer


def _metrics(ranks: np.ndarray, k: int, recall_k: int | None = None) -> dict[str, float]:
    """`ranks` [U]: 0-based rank of each target (large = not ranked)."""
    hit = ranks < k
    out = {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())}
    if recall_k is not None:
        out[f"recall@{recall_k}"] = float((ranks < recall_k).mean())
    return out


def _rank_in_lists(lists: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[U, n] recommended item ids, [U] targets -> [U] rank of the target (n when absent)."""
    match = lists == targets[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), lists.shape[1])


def leave_last_out(tokenizer: BehaviourTokenizer, history: pd.DataFrame, test: pd.DataFrame, config: EvalConfig) -> pd.DataFrame:
    """One row per evaluated user: their target behaviour and all behaviours strictly before it."""
    test_beh = tokenizer.behaviours(test)
    targets = test_beh.groupby("user_id", sort=True).tail(1)
    if config.max_users and len(targets) > config.max_users:  # 0 or None: every user
        targets = targets.sample(config.max_users, random_state=config.seed).sort_values("user_id")
    return targets.reset_index(drop=True)


def behaviours_before_targets(tokenizer: BehaviourTokenizer, all_events: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    """Each evaluated user's behaviours strictly before their target's time (what model and baselines may see)."""
    behaviours = tokenizer.behaviours(all_events)
    cut = targets.set_index("user_id")["ts"]
    return behaviours[behaviours["ts"] < behaviours["user_id"].map(cut)]


def query_conditions(tokenizer: BehaviourTokenizer, targets: pd.DataFrame, history_events: pd.DataFrame, query: str,
                     after_event: tuple[str, ...] = ()) -> tuple[np.ndarray, dict[str, Any]]:
    """([U] the condition token ending each target's prompt, what it was made of).

    query "target": the target's own token. "request": the target's condition columns, except those in `after_event`
    (known only after the event), which take their most frequent value in `history_events`. "col=value[|...]": those
    values for every target, the other columns as under "request".
    """
    columns = list(tokenizer.config.condition_columns)
    if query == "target":
        return tokenizer.condition_ids(targets), {"query": "target", "note": "the target's own condition token (can reveal the answer)"}
    frame = targets[columns].copy()
    values: dict[str, str] = {}
    for column in after_event:
        if column in columns:
            counts = history_events[column].astype("string").value_counts() if column in history_events.columns else pd.Series(dtype=int)
            values[column] = str(counts.index[0]) if len(counts) else "?"
    if query != "request":
        pairs = dict(part.split("=", 1) for part in query.split("|") if "=" in part)
        if not pairs or set(pairs) - set(columns):
            raise ValueError(f"evaluate.query '{query}': expected request, target or col=value[|col=value] over the model's "
                             f"condition columns ({', '.join(columns)})")
        values.update(pairs)
    for column, value in values.items():
        frame[column] = value
    return tokenizer.condition_ids(frame), {"query": query, "fixed_values": values}


def model_lists(
    engine: RetrievalEngine,
    tokenizer: BehaviourTokenizer,
    before: pd.DataFrame,
    targets: pd.DataFrame,
    config: EvalConfig,
    depth: int,
    progress: bool = False,
    conditions: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """[U, depth] the model's retrieved items per target (None-padded) and [U] whether the target can be generated.

    before: each target user's behaviours strictly before the target (`behaviours_before_targets`); conditions: [U]
    the query condition token of each prompt (`query_conditions`; default: the target's own)."""
    trie = ItemTrie.from_tokenizer(tokenizer)
    generable = {item for names in trie.items.values() for item in names}
    histories = tokenizer.encode_histories(before)
    cond_tok = tokenizer.condition_ids(targets) if conditions is None else conditions
    users = targets["user_id"].astype(str).to_numpy()
    groups = []
    for i, user in enumerate(users):
        tokens = histories.get(user, np.array([BOS], dtype=np.int64))
        groups.append(QueryGroup(user, tokens, np.array([len(tokens)]), np.array([cond_tok[i]]), [(i, "")]))
    lists = np.full((len(targets), depth), None, dtype=object)
    for start in tqdm(range(0, len(groups), config.batch_size), disable=bars_off(progress), desc="evaluating"):
        chunk = groups[start : start + config.batch_size]
        for offset, per_group in enumerate(beam_search(engine, trie, chunk, config.beam, depth)):
            ranked = [item for item, _ in per_group[0]]
            lists[start + offset, : len(ranked)] = ranked
    reachable = np.array([item in generable for item in targets["item_id"].astype(str)], dtype=bool)
    return lists, reachable


def baseline_lists(
    tokenizer: BehaviourTokenizer, history_events: pd.DataFrame, before: pd.DataFrame, targets: pd.DataFrame, depth: int
) -> dict[str, np.ndarray]:
    """[U, depth] lists of the popularity (from `history_events`) and recent-items (from `before`) baselines."""
    popular = tokenizer.behaviours(history_events)["item_id"].astype(str).value_counts().index.to_numpy()[: 2 * depth]
    pop_lists = np.full((len(targets), depth), None, dtype=object)
    pop_lists[:, : min(depth, len(popular))] = popular[:depth]
    recent_by_user = before.groupby("user_id", sort=False)["item_id"].apply(lambda s: list(dict.fromkeys(s.astype(str).to_numpy()[::-1]))[:depth])
    recent_lists = np.full((len(targets), depth), None, dtype=object)
    for row, user in enumerate(targets["user_id"]):
        recent = recent_by_user.get(user, [])
        merged = (recent + [p for p in popular if p not in recent])[:depth]
        recent_lists[row, : len(merged)] = merged
    return {"popularity": pop_lists, "recent": recent_lists}


def baseline_ranks(
    tokenizer: BehaviourTokenizer, history_events: pd.DataFrame, all_events: pd.DataFrame, targets: pd.DataFrame, k: int
) -> dict[str, np.ndarray]:
    """Ranks of the targets in the popularity list and in each user's recent items (k when absent)."""
    target_items = targets["item_id"].astype(str).to_numpy()
    before = behaviours_before_targets(tokenizer, all_events, targets)
    return {name: _rank_in_lists(lists, target_items) for name, lists in baseline_lists(tokenizer, history_events, before, targets, k).items()}


def sasrec_lists(
    tokenizer: BehaviourTokenizer, train_events: pd.DataFrame, before: pd.DataFrame, targets: pd.DataFrame, config: EvalConfig, depth: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """[U, depth] the SASRec-style baseline's lists, trained on `train_events`, and facts of its training."""
    from lum.sasrec import train_sasrec

    trained = train_sasrec(tokenizer.behaviours(train_events), config.sasrec_model)
    by_user = before.groupby("user_id", sort=False)["item_id"].apply(lambda s: s.astype(str).tolist())
    histories = [by_user.get(user, []) for user in targets["user_id"]]
    lists = np.full((len(targets), depth), None, dtype=object)
    top = trained.top_items(histories, depth)
    lists[:, : top.shape[1]] = top
    return lists, {"best_epoch": trained.best_epoch, "validation_ndcg@10": round(trained.validation_ndcg10, 4), "items": len(trained.item_ids)}


def hold_out_items(events: pd.DataFrame, fraction: float, seed: int = 0) -> np.ndarray:
    """A seeded `fraction` of the items occurring in `events`, sorted: the cold items of TIGER's cold-start test.

    Drop their events from the pretraining window (`events[~events.item_id.isin(cold)]`) and evaluate on targets
    that are cold items: a semantic-id model can still generate them (their codes come from content), an id model
    cannot (they have no token)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the share of items held out must be between 0 and 1, got {fraction}")
    items = np.array(sorted(events["item_id"].astype(str).unique()), dtype=object)
    n = max(1, int(round(fraction * len(items))))
    return np.sort(np.random.default_rng(seed).choice(items, n, replace=False))


def cold_item_stats(lists: np.ndarray, target_items: np.ndarray, cold: set[str], k: int, recall_k: int) -> dict[str, float]:
    """How a method treats cold items: the share of its top-k slots they fill, the share of users whose top-k holds
    one, and HR@k / Recall@R over the targets that are cold items."""
    top = lists[:, :k]
    is_cold = np.vectorize(lambda item: item in cold, otypes=[bool])(top) if top.size else np.zeros(top.shape, bool)
    cold_target = np.array([t in cold for t in target_items], dtype=bool)
    ranks = _rank_in_lists(lists[cold_target], target_items[cold_target]) if cold_target.any() else np.zeros(0, np.int64)
    return {
        f"cold_share_of_top{k}": float(is_cold.sum() / max(1, np.count_nonzero(top != None))),  # noqa: E711 (elementwise)
        f"users_with_cold_in_top{k}": float(is_cold.any(axis=1).mean()) if len(top) else 0.0,
        "cold_targets": int(cold_target.sum()),
        f"cold_hr@{k}": float((ranks < k).mean()) if len(ranks) else None,
        f"cold_recall@{recall_k}": float((ranks < recall_k).mean()) if len(ranks) else None,
    }


def evaluate_next_item(
    model: LlamaForCausalLM | None,
    tokenizer: BehaviourTokenizer,
    events_before: pd.DataFrame,
    test: pd.DataFrame,
    config: EvalConfig = EvalConfig(),
    progress: bool = False,
    train_events: pd.DataFrame | None = None,
    engine: RetrievalEngine | None = None,
    cold_items: np.ndarray | None = None,
    after_event: tuple[str, ...] = (),
) -> dict[str, Any]:
    """HR@k / NDCG@k / Recall@R of the model and the baselines, overall and per target condition.

    events_before: every event before the test window (histories and the popularity list); train_events: the LM's
    pretraining window, which the SASRec baseline trains on (default: events_before); engine: the retrieval engine
    (default: the torch reference engine on `model`); cold_items: items held out of pretraining (`hold_out_items`),
    for the `cold_items` section; after_event: condition columns known only after the event (never in the query).
    """
    targets = leave_last_out(tokenizer, events_before, test, config)
    if targets.empty:
        raise ValueError("the test window holds no behaviours to evaluate")
    if engine is None:
        if model is None:
            raise ValueError("pass the model or a retrieval engine")
        engine = TorchRetrievalEngine.from_model(model.eval())
    depth = max(config.k, config.recall_k)
    # what the model and every baseline may see of each target user: their behaviours strictly before the target
    before = behaviours_before_targets(tokenizer, pd.concat([events_before, test], ignore_index=True), targets)
    conditions, query = query_conditions(tokenizer, targets, tokenizer.behaviours(events_before), config.query, after_event)
    lists, reachable = model_lists(engine, tokenizer, before, targets, config, depth, progress, conditions)
    all_lists = {"model": lists, **baseline_lists(tokenizer, events_before, before, targets, depth)}
    own = tokenizer.condition_ids(targets)
    query["share_equal_to_target_token"] = float(np.mean(conditions == own))
    out: dict[str, Any] = {"users": int(len(targets)), "k": config.k, "recall_k": config.recall_k,
                           "item_tokenization": tokenizer.config.item_tokenization,
                           "target_not_generable": float(np.mean(~reachable)), "query": query}
    if config.target_extra and config.query != "target" and (conditions != own).any():
        extra, _ = model_lists(engine, tokenizer, before, targets, config, depth, progress, own)
        ranks = _rank_in_lists(extra, targets["item_id"].astype(str).to_numpy())
        out["target_conditioned"] = {"note": "the model prompted with the target's own condition token, which can reveal the "
                                             "answer (MovieLens: the feedback level of the rating being predicted); not comparable "
                                             "with the baselines", "model": _metrics(ranks, config.k, config.recall_k)}
    if config.sasrec:
        all_lists["sasrec"], out["sasrec"] = sasrec_lists(tokenizer, events_before if train_events is None else train_events,
                                                          before, targets, config, depth)
    target_items = targets["item_id"].astype(str).to_numpy()
    ranks = {name: _rank_in_lists(found, target_items) for name, found in all_lists.items()}
    condition_name = np.array([tokenizer.vocab[c] for c in tokenizer.condition_ids(targets)])
    out["overall"] = {name: _metrics(r, config.k, config.recall_k) for name, r in ranks.items()}
    out["per_condition"] = {}
    for value in np.unique(condition_name):
        sel = condition_name == value
        out["per_condition"][value] = {"users": int(sel.sum()), **{name: _metrics(r[sel], config.k, config.recall_k) for name, r in ranks.items()}}
    if cold_items is not None:
        cold = {str(i) for i in cold_items}
        out["cold_items"] = {"held_out": len(cold), **{name: cold_item_stats(found, target_items, cold, config.k, config.recall_k)
                                                        for name, found in all_lists.items()}}
    return out


def format_evaluation(result: dict[str, Any]) -> str:
    k, r = result["k"], result["recall_k"]
    rows = {name: m for name, m in result["overall"].items()}
    frame = pd.DataFrame(rows).T[[f"hr@{k}", f"ndcg@{k}", f"recall@{r}"]].map(lambda v: f"{v:.4f}")
    lines = [f"{result['users']} users ({result['item_tokenization']} items), targets the model cannot generate: "
             f"{result['target_not_generable']:.1%}", frame.to_string()]
    query = result.get("query") or {}
    if query:
        fixed = ", ".join(f"{k}={v}" for k, v in (query.get("fixed_values") or {}).items())
        lines.append(f"query condition: {query.get('query')}" + (f" ({fixed} for every target)" if fixed else "")
                     + f"; equal to the target's own token for {query.get('share_equal_to_target_token', 1.0):.0%} of targets")
    if "target_conditioned" in result:
        m = result["target_conditioned"]["model"]
        lines.append(f"extra, not comparable: the model under the target's own condition token (can reveal the answer): "
                     f"HR@{k} {m[f'hr@{k}']:.4f}, NDCG@{k} {m[f'ndcg@{k}']:.4f}, Recall@{r} {m[f'recall@{r}']:.4f}")
    if "sasrec" in result:
        lines.append(f"sasrec: {result['sasrec']['items']} items, stopped at epoch {result['sasrec']['best_epoch']} "
                     f"(validation NDCG@10 {result['sasrec']['validation_ndcg@10']:.4f}, on its training window)")
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
    if "cold_items" in result:
        cold = {name: v for name, v in result["cold_items"].items() if name != "held_out"}
        lines += [f"cold items ({result['cold_items']['held_out']} held out of pretraining):",
                  pd.DataFrame(cold).T.map(lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)).to_string()]
    return "\n".join(lines)
