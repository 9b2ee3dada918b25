"""Knowledge querying (LUM step 2): per-user, per-condition embeddings from a trained behaviour LM.

A query is a prompt = [BOS] + the user's behaviours before the as-of time + one query condition token; its
embedding is the hidden state at that condition token after the final norm ("what this user wants under
condition c"). Several conditions share one history (LUM's group query), so:

* the **torch engine** runs each history once and evaluates all its query tokens in the same forward pass: the
  query tokens are appended after the history, each attends to the history prefix it belongs to and to itself
  only, and takes the position right after that prefix (a custom 4D attention mask). In rolling mode the queries
  of all of a user's rows sit behind one copy of the user's history, each seeing its own prefix (KV reuse);
* the **vLLM engine** submits the prompts of one history adjacently and lets prefix caching compute it once.

Both engines see exactly the same prompts, built by `build_queries`. In snapshot mode a history is left-filled with
extra [BOS] tokens to a multiple of the tokenizer's `prompt_align` (32, vLLM's CPU block size): prefix caching
shares whole blocks only, so without the fill every further condition recomputes the history's last partial block
(on ~120-token prompts K=4 cost 1.4x K=1; with the fill about 1.2x). Pretraining puts 0..31 such [BOS] before
every segment, so any fill is familiar to the model; the fill of a query depends on its own history's length only.
Rolling mode does not fill (rows of a user share their history across rows instead, and a fill that fits one row's
prefix would break that sharing), so a snapshot and a rolling vector of the same user and time differ slightly.
History window: the last `max_history`
behaviours before the as-of time. In rolling mode the window start moves in steps of `window_stride`
behaviours (never more than `max_history` behaviours, never fewer than `max_history - window_stride + 1` once the
history is that long), so consecutive rows of a user share a prefix.

Users without any behaviour before the as-of time get no row (they are counted in the job's manifest): a ranker
sees a missing feature, never a made-up vector.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from contracts.names import REQUEST_CONDITION
from lum.config import VllmSettings  # noqa: F401  (re-exported)
from lum.tokenizer import BOS, PAD, BehaviourTokenizer

REQUEST = REQUEST_CONDITION  # the query condition taken from each as-of row's own context
REQUEST_TOKEN = -1  # its placeholder id until the row's token is known


@dataclass
class QueryGroup:
    """One history and the queries asked against its prefixes.

    tokens: [L] the shared history ([BOS] + behaviours)
    prefix_lengths: [Q] how many tokens of `tokens` each query sees (its prompt is tokens[:n] + condition)
    conditions: [Q] condition token id of each query
    keys: [Q] (row key, condition name) of each query, carried to the output
    """

    user_id: str
    tokens: np.ndarray
    prefix_lengths: np.ndarray
    conditions: np.ndarray
    keys: list[tuple[object, str]] = field(default_factory=list)

    @property
    def n_queries(self) -> int:
        return len(self.conditions)

    def prompts(self) -> list[np.ndarray]:
        """The full prompt of every query (what vLLM receives)."""
        return [np.append(self.tokens[:n], c) for n, c in zip(self.prefix_lengths, self.conditions)]


def resolve_conditions(tokenizer: BehaviourTokenizer, conditions: str | list[str]) -> list[tuple[str, int]]:
    """`all` (every full-combination condition token) or a list of names like `surface=home|device=mobile`.

    The name `request` asks, for every as-of row, the condition of that row itself (its own surface, device,
    ... : "what this user wants in the context of this request"); its rows must carry the condition columns.

    Returns (name, token id) pairs. Unknown names fail with the list of known ones.
    """
    known = {t[2:]: tokenizer.token_to_id[t] for t in tokenizer.condition_tokens}
    if conditions == "all" or conditions == ["all"]:
        return [(t[2:], tokenizer.token_to_id[t]) for t in tokenizer.full_condition_tokens()]
    names = conditions.split(",") if isinstance(conditions, str) else list(conditions)
    known[REQUEST] = REQUEST_TOKEN
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown query condition(s) {', '.join(unknown)}; this model knows: {', '.join(sorted(known))}"
        )
    return [(n, known[n]) for n in names]


def build_queries(
    tokenizer: BehaviourTokenizer,
    events: pd.DataFrame,
    as_of: pd.DataFrame,
    conditions: list[tuple[str, int]],
    max_history: int,
    window_stride: int,
    align: int = 1,
) -> tuple[list[QueryGroup], int]:
    """Query groups for every (user, as-of time) in `as_of` (columns user_id, ts, key).

    align: left-fill every history with extra [BOS] to a multiple of this many tokens (the snapshot mode of the
    embedding job passes the tokenizer's `prompt_align`; 1 = no fill). A query's fill then depends on the length
    of its own history only (never on a later row's), so each distinct history gets a group of its own.

    Returns the groups and the number of (user, as-of) pairs skipped for having no history before the as-of time.
    """
    beh = tokenizer.behaviours(events)
    tpb = 1 + tokenizer.config.tokens_per_item
    body_tokens = (
        np.concatenate([tokenizer.condition_ids(beh)[:, None], tokenizer.item_ids(beh["item_id"])], axis=1)
        if len(beh)
        else np.zeros((0, tpb), np.int64)
    )
    beh_ts = beh["ts"].to_numpy()
    users = beh["user_id"].astype(str).to_numpy()
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True]) if len(users) else np.array([0])
    spans = {users[a]: (a, b) for a, b in zip(bounds[:-1], bounds[1:])}
    groups: list[QueryGroup] = []
    skipped = 0
    cond_ids = np.array([c for _, c in conditions], dtype=np.int64)
    cond_names = [n for n, _ in conditions]
    per_row = cond_ids == REQUEST_TOKEN
    if per_row.any():
        as_of = as_of.assign(request_token=tokenizer.condition_ids(as_of))  # a clear error when the columns are missing
    for user, rows in as_of.groupby("user_id", sort=True):
        a, b = spans.get(str(user), (0, 0))
        times = rows["ts"].to_numpy()
        counts = np.searchsorted(beh_ts[a:b], times, side="left")  # behaviours strictly before each as-of time
        has = counts > 0
        skipped += int((~has).sum())
        if not has.any():
            continue
        counts, keys = counts[has], rows["key"].to_numpy()[has]
        row_tokens = rows["request_token"].to_numpy()[has] if per_row.any() else np.zeros(len(keys), np.int64)
        over = np.maximum(counts - max_history, 0)
        starts = -(-over // window_stride) * window_stride  # ceil to a multiple of the stride
        for start in np.unique(starts):
            in_window = starts == start
            ends = [None] if align == 1 else np.unique(counts[in_window])
            for end_count in ends:
                sel = in_window if end_count is None else in_window & (counts == end_count)
                end = int(counts[sel].max())
                history = body_tokens[a + start : a + end].ravel()
                fill = -(1 + len(history)) % align  # extra [BOS] so the history fills whole prefix-cache blocks
                tokens = np.concatenate([np.full(1 + fill, BOS), history]).astype(np.int64)
                prefix = 1 + fill + (counts[sel] - start) * tpb
                groups.append(
                    QueryGroup(
                        user_id=str(user),
                        tokens=tokens,
                        prefix_lengths=np.repeat(prefix, len(cond_ids)),
                        conditions=np.where(per_row[None, :], row_tokens[sel][:, None], cond_ids[None, :]).ravel(),
                        keys=[(k, name) for k in keys[sel] for name in cond_names],
                    )
                )
    return groups, skipped


class Engine(Protocol):
    def embed(self, groups: list[QueryGroup]) -> list[np.ndarray]:
        """[Q, H] float32 per group, in query order."""
        ...

    def close(self) -> None: ...


def load_for_inference(model_dir: str, dtype: torch.dtype = torch.float32, threads: int | None = None) -> torch.nn.Module:
    """The LM of a model folder in eval mode, SDPA attention (what both torch engines, embedding and retrieval, run)."""
    from transformers import LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()


def token_batches(sizes: list[int], max_batch_tokens: int, rows: Iterable[int] | None = None) -> Iterator[list[int]]:
    """Row indices (all of them, or `rows`) by increasing size, cut into batches whose padded size, rows x the
    longest, stays within `max_batch_tokens` (a longer row alone is a batch of its own)."""
    batch: list[int] = []
    for i in sorted(range(len(sizes)) if rows is None else rows, key=lambda i: sizes[i]):
        if batch and (len(batch) + 1) * max(sizes[i], 1) > max_batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def forward_rows(model: torch.nn.Module, rows: list[tuple[np.ndarray, ...]]) -> torch.Tensor:
    """[B, T, H] last hidden states of rows given as (token ids [T], position ids [T], attention mask [T, T], ...)."""
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))
    pos = torch.from_numpy(np.stack([r[1] for r in rows]))
    mask = torch.from_numpy(np.stack([r[2] for r in rows]))[:, None]  # [B, 1, T, T]
    return model.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state


class TorchEngine:
    """Group query with `transformers`: each history once, all its queries in the same forward pass."""

    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32, max_batch_tokens: int = 16_384, threads: int | None = None):
        self.model = load_for_inference(model_dir, dtype, threads)
        self.max_batch_tokens = max_batch_tokens

    @staticmethod
    def _row(group: QueryGroup, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids [T], position ids [T] and the boolean attention mask [T, T] of one group padded to `width`."""
        L, Q = len(group.tokens), group.n_queries
        ids = np.full(width, PAD, dtype=np.int64)
        ids[:L] = group.tokens
        ids[L : L + Q] = group.conditions
        pos = np.zeros(width, dtype=np.int64)
        pos[:L] = np.arange(L)
        pos[L : L + Q] = group.prefix_lengths  # a query sits right after its prefix
        mask = np.zeros((width, width), dtype=bool)
        mask[:L, :L] = np.tril(np.ones((L, L), dtype=bool))  # the history: causal
        q = np.arange(L, L + Q)
        mask[q[:, None], np.arange(L)[None, :]] = np.arange(L)[None, :] < group.prefix_lengths[:, None]
        mask[q, q] = True  # each query also sees itself, and no other query
        pad = np.arange(L + Q, width)
        mask[pad, pad] = True  # padding sees only itself (a row with nothing to attend to would give NaN)
        return ids, pos, mask

    @torch.no_grad()
    def embed(self, groups: list[QueryGroup]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.zeros((0,))] * len(groups)
        sizes = [len(g.tokens) + g.n_queries for g in groups]
        for batch in token_batches(sizes, self.max_batch_tokens):
            width = max(sizes[i] for i in batch)
            hidden = forward_rows(self.model, [self._row(groups[i], width) for i in batch])
            for r, i in enumerate(batch):
                L, Q = len(groups[i].tokens), groups[i].n_queries
                out[i] = hidden[r, L : L + Q].float().numpy()
        return out

    def close(self) -> None:
        pass


def resolve_vllm_dtype(dtype: str) -> str:
    """`auto` -> bfloat16 where the hardware computes it natively, else float32; any other name as given."""
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available():
        return "bfloat16"
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def start_vllm(model_dir: str, max_model_len: int, settings: VllmSettings, **runner: object) -> tuple[object, object]:
    """(vllm.LLM, watchdog) on a model folder with our engine settings; `runner`: the runner's own arguments.

    vLLM's engine core and workers (the model and its KV cache) would outlive a killed job: the watchdog process
    stops them (contracts/processes.py); `stop_vllm` shuts both down."""
    import os

    from contracts.threads import usable_cpu_list

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    # vLLM's own `auto` binds one thread per core of a NUMA node, whatever the cgroup quota allows
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", settings.cpu_threads_bind or usable_cpu_list())
    from vllm import LLM

    from contracts.processes import watch_descendants

    watchdog = watch_descendants()
    llm = LLM(
        model=str(model_dir),
        dtype=resolve_vllm_dtype(settings.dtype),
        enforce_eager=True,
        max_model_len=max_model_len,
        block_size=settings.block_size,
        enable_prefix_caching=settings.enable_prefix_caching,
        max_num_batched_tokens=max(settings.max_num_batched_tokens, max_model_len),
        tensor_parallel_size=settings.tensor_parallel_size,
        seed=0,
        **runner,
    )
    return llm, watchdog


def stop_vllm(llm: object, watchdog: object) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - shutting down twice or after a crash must not mask the real error
        pass
    if watchdog.poll() is None:  # the engine's processes are gone: nothing left to watch over
        watchdog.kill()
        watchdog.wait()


class VllmEngine:
    """The production path: vLLM's pooling runner, last-token pooling, no normalisation, token-id prompts."""

    def __init__(self, model_dir: str, max_model_len: int, settings: VllmSettings = VllmSettings()):
        from vllm import PoolingParams
        from vllm.config import PoolerConfig

        self._params = PoolingParams(use_activation=False)
        self.llm, self._watchdog = start_vllm(model_dir, max_model_len, settings, runner="pooling", convert="embed",
                                              pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False))

    def embed(self, groups: list[QueryGroup]) -> list[np.ndarray]:
        from vllm.inputs import TokensPrompt

        prompts, sizes = [], []
        for g in groups:  # a group's prompts adjacent: its history is computed once and then served from cache
            prompts += [TokensPrompt(prompt_token_ids=p.tolist()) for p in g.prompts()]
            sizes.append(g.n_queries)
        outputs = self.llm.embed(prompts, pooling_params=self._params, use_tqdm=False)
        vectors = np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)
        return np.split(vectors, np.cumsum(sizes)[:-1]) if groups else []

    def close(self) -> None:
        stop_vllm(self.llm, self._watchdog)
