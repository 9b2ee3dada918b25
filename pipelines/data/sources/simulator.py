"""A synthetic marketplace with known ground truth: the embedded default data source.

Generative story (everything drawn from one seed; numbers are the `SimulatorConfig` defaults):

* **Items.** `n_categories` categories, each a random unit vector in a `latent_dim`-d taste space; an item's
  latent vector is its category's vector plus noise. Popularity is long-tailed (log-normal), so a few items
  take most impressions. Content features (`content`, a noisy linear projection of the latent vector, plus a
  price) let a cold item be understood without any interactions. A share of items (`new_item_share`) is
  released during the window and never shown before its release time. Each category has a *complement*
  category (the thing you buy next to it: phone -> phone case).
* **Users.** Each user has 2-4 interests. An interest is a taste vector (near some category) with a preferred
  device and a preferred part of the day: e.g. "gadgets on desktop in the morning, cooking on mobile in the
  evening". Users join over the window (cold users), and are more or less active (log-normal).
* **Sessions.** A session starts with a *mood*: one of the user's interests, drawn by its weight. The mood
  mostly decides the session's device and time of day (with probability `context_fidelity`), so the context
  tells which interest is active. Interests drift: at every session each interest moves a little, and with
  probability `interest_shift` one interest is replaced by a new category, so old behaviour goes stale and a
  user's recent behaviour predicts the next better than their whole history.
* **Requests.** A session is a run of requests on surfaces: `home` (feed: shows the mood), `search` (shows the
  mood, sharper), `item_detail` (items similar to the last clicked item), `cart` (the complement of the last
  clicked item's category). Which surface comes next depends on whether the previous request got a click.
* **Impressions.** Each request shows a slate of `slate_size` candidates (half retrieved near the target taste,
  some popular, some random), ordered by a mediocre logging policy (noisy popularity). The true click
  probability is `p_click = relevance * examination(position)`, with
  `relevance = sigmoid(bias + sharpness[surface] * cos(target, item) + popularity + user bias)` and
  `examination(position) = (1 + position) ** -position_decay`. The label is a Bernoulli draw of `p_click`.
  `relevance` and `p_click` are stored on every row (marked `truth`: never features) so an A/B simulation can
  re-rank a slate and compute the expected clicks.

Why it is a fair test bed for a sequence model: which interest is active depends on the context (condition
tokens), what is relevant on item_detail/cart depends on the last clicked item (order matters), and
interests drift (a static user-id embedding learned from old data goes stale). None of this is captured by
user and item ids alone.

Output columns: conditions `surface`, `device`, `daypart` (known at request time); extras `hour`, `position`,
`session_id`, `request_id` (request time) and `relevance`, `p_click` (truth). Items: `item_id`, `title`,
`category`, `price`, `content` (list<float32>), `release_ts`.

The `large` preset streams users in chunks to Parquet so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from contracts.files import atomic_path
from contracts.progress import bars_off
from pipelines.data.contract import ColumnSpec, EventContract, ValidationOptions, validate_events, write_parquet_atomic
from pipelines.data.sources.base import write_dataset_info
from pipelines.paths import RunPaths

SURFACES = ("home", "search", "item_detail", "cart")
DEVICES = ("mobile", "desktop", "tablet")
DAYPARTS = ("night", "morning", "afternoon", "evening")  # hours [0,6), [6,12), [12,18), [18,24)
HOME, SEARCH, ITEM_DETAIL, CART = range(4)

# Next-surface probabilities (rows: previous request clicked or not; columns: SURFACES order).
NEXT_SURFACE_AFTER_CLICK = np.array([0.15, 0.10, 0.55, 0.20])
NEXT_SURFACE_AFTER_NO_CLICK = np.array([0.55, 0.30, 0.15, 0.0])
FIRST_SURFACE = np.array([0.6, 0.4, 0.0, 0.0])

SIMULATOR_CONTRACT = EventContract(
    conditions=(
        ColumnSpec("surface", "condition", "request"),
        ColumnSpec("device", "condition", "request"),
        ColumnSpec("daypart", "condition", "request"),
    ),
    extras=(
        ColumnSpec("hour", "extra", "request", "int64"),
        ColumnSpec("position", "extra", "request", "int64"),
        ColumnSpec("session_id", "extra", "request", "string"),
        ColumnSpec("request_id", "extra", "request", "string"),
        ColumnSpec("relevance", "extra", "truth", "float64"),
        ColumnSpec("p_click", "extra", "truth", "float64"),
    ),
)


@dataclass(frozen=True)
class SimulatorConfig:
    """All knobs of the simulator. Presets: `PRESETS[name]`."""

    n_users: int = 20_000
    n_items: int = 5_000
    n_categories: int = 40
    latent_dim: int = 16
    content_dim: int = 8
    days: int = 60
    start: str = "2025-01-01"
    mean_sessions: float = 2.7  # per user over the window, before activity scaling
    mean_requests_per_session: float = 2.5
    max_requests_per_user: int = 64
    slate_size: int = 10
    retrieved_share: float = 0.6  # of a slate: candidates retrieved near the target taste
    popular_share: float = 0.2  # popular candidates; the rest are uniformly random
    retrieval_sharpness: float = 8.0
    cold_user_share: float = 0.4  # users who join during the window instead of at its start
    new_item_share: float = 0.2  # items released during the window
    context_fidelity: float = 0.8  # probability that a session's device / daypart follow its mood
    interest_drift: float = 0.05  # per-session random-walk step (per dimension) of each interest vector
    interest_shift: float = 0.2  # per-session probability that one interest becomes a new category
    base_logit: float = -2.3
    sharpness: tuple[float, float, float, float] = (3.0, 4.5, 4.0, 3.5)  # home, search, item_detail, cart
    position_decay: float = 0.6
    chunk_users: int = 25_000
    seed: int = 0


PRESETS: dict[str, SimulatorConfig] = {
    "tiny": SimulatorConfig(n_users=300, n_items=300, n_categories=12, days=30, chunk_users=300),
    "default": SimulatorConfig(),
    "large": SimulatorConfig(n_users=1_000_000, n_items=100_000, n_categories=200, days=90, chunk_users=50_000),
}


def examination(position: np.ndarray, decay: float) -> np.ndarray:
    """Position bias: probability that a user looks at slot `position` (0 = top)."""
    return (1.0 + position) ** -decay


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of `probs` [N, K] -> [N]."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cum[:, -1:]
    return np.minimum((cum < u).sum(axis=1), probs.shape[1] - 1)


@dataclass
class ItemCatalog:
    """Items and categories; all arrays indexed by item or category index."""

    category_vectors: np.ndarray  # [C, D]
    complement: np.ndarray  # [C] category -> complement category
    category: np.ndarray  # [I]
    latent: np.ndarray  # [I, D], unit norm
    log_popularity: np.ndarray  # [I]
    release_us: np.ndarray  # [I] epoch microseconds
    content: np.ndarray  # [I, content_dim]
    price: np.ndarray  # [I]
    # Popularity-weighted sampling: items sorted by category, cumulative popularity per category.
    by_category: np.ndarray  # [I] item indices sorted by category
    cum_popularity: np.ndarray  # [I] cumulative popularity along by_category
    category_bounds: np.ndarray  # [C + 1] cumulative popularity at each category's start
    n_initial: int  # items 0..n_initial-1 exist from the start of the window

    def table(self) -> pa.Table:
        n = len(self.category)
        ids = _prefixed_ids("i", np.arange(n))
        return pa.table(
            {
                "item_id": ids,
                "title": pc.binary_join_element_wise(pa.scalar("Item "), pa.array(np.arange(n)).cast(pa.string()), ""),
                "category": _prefixed_ids("c", self.category),
                "price": pa.array(self.price, pa.float64()),
                "content": pa.array(list(self.content.astype(np.float32)), pa.list_(pa.float32())),
                "release_ts": pa.array(self.release_us, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            }
        )


def _prefixed_ids(prefix: str, index: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix), pa.array(index, pa.int64()).cast(pa.string()), "")


def make_catalog(config: SimulatorConfig) -> ItemCatalog:
    rng = np.random.default_rng([config.seed, 1])
    C, D, I = config.n_categories, config.latent_dim, config.n_items  # noqa: E741  (the model's notation)
    category_vectors = _unit(rng.normal(size=(C, D)))
    complement = rng.permutation(C)
    category = rng.integers(0, C, size=I)
    latent = _unit(category_vectors[category] + 0.35 * rng.normal(size=(I, D)))
    log_popularity = rng.normal(0.0, 1.2, size=I)
    start_us = pd.Timestamp(config.start, tz="UTC").value // 1000
    window_us = config.days * 86_400 * 10**6
    n_initial = int(round(I * (1.0 - config.new_item_share)))
    release_us = np.full(I, start_us, dtype=np.int64)
    release_us[n_initial:] = np.sort(start_us + rng.integers(0, window_us, size=I - n_initial))
    projection = rng.normal(size=(D, config.content_dim)) / np.sqrt(D)
    content = latent @ projection + 0.1 * rng.normal(size=(I, config.content_dim))
    price = np.round(np.exp(2.5 + 0.5 * category_vectors[category, 0] + 0.3 * rng.normal(size=I)), 2)
    by_category = np.argsort(category, kind="stable")
    cum_popularity = np.cumsum(np.exp(log_popularity[by_category]))
    counts = np.bincount(category, minlength=C)
    category_bounds = np.concatenate([[0.0], cum_popularity[np.cumsum(counts) - 1]])
    category_bounds[1:][counts == 0] = np.nan  # empty categories are never drawn (see _draw_in_categories)
    category_bounds = pd.Series(category_bounds).ffill().fillna(0.0).to_numpy()
    return ItemCatalog(
        category_vectors, complement, category, latent, log_popularity, release_us, content, price,
        by_category, cum_popularity, category_bounds, n_initial,
    )


def _draw_in_categories(rng: np.random.Generator, catalog: ItemCatalog, categories: np.ndarray) -> np.ndarray:
    """Draw one item per entry of `categories`, popularity-weighted within the category. Empty -> random item."""
    lo = catalog.category_bounds[categories]
    hi = catalog.category_bounds[categories + 1]
    u = lo + rng.random(categories.shape) * (hi - lo)
    pos = np.minimum(np.searchsorted(catalog.cum_popularity, u, side="right"), len(catalog.by_category) - 1)
    items = catalog.by_category[pos]
    empty = hi <= lo
    items[empty] = rng.integers(0, catalog.n_initial, size=int(empty.sum()))
    return items


@dataclass
class _Schedule:
    """Requests of a chunk of users laid out as [U, R] matrices (R = most requests of any user)."""

    valid: np.ndarray  # [U, R] bool
    ts_us: np.ndarray  # [U, R] int64
    session: np.ndarray  # [U, R] global session index
    first_in_session: np.ndarray  # [U, R] bool
    mood: np.ndarray  # [U, R] interest slot of the session
    device: np.ndarray  # [U, R]
    daypart: np.ndarray  # [U, R]
    hour: np.ndarray  # [U, R]
    shift: np.ndarray  # [U, R] bool: at this session start one interest becomes a new category
    shift_slot: np.ndarray  # [U, R]
    shift_category: np.ndarray  # [U, R]


def _make_users(rng: np.random.Generator, config: SimulatorConfig, catalog: ItemCatalog, n_users: int):
    K = 4
    n_interests = rng.integers(2, K + 1, size=n_users)
    has_interest = np.arange(K)[None, :] < n_interests[:, None]
    interest_category = rng.integers(0, config.n_categories, size=(n_users, K))
    interest_vec = _unit(catalog.category_vectors[interest_category] + 0.3 * rng.normal(size=(n_users, K, config.latent_dim)))
    weight = rng.dirichlet(np.ones(K), size=n_users) * has_interest
    weight /= weight.sum(axis=1, keepdims=True)
    preferred_device = rng.choice(len(DEVICES), size=(n_users, K), p=[0.55, 0.35, 0.10])
    preferred_daypart = rng.choice(len(DAYPARTS), size=(n_users, K), p=[0.1, 0.3, 0.25, 0.35])
    user_bias = rng.normal(0.0, 0.3, size=n_users)
    activity = rng.lognormal(-0.32, 0.8, size=n_users)  # mean about 1
    join_day = np.where(rng.random(n_users) < config.cold_user_share, rng.random(n_users) * config.days * 0.85, 0.0)
    return interest_vec, weight, preferred_device, preferred_daypart, user_bias, activity, join_day


def _make_schedule(rng, config, n_users, weight, preferred_device, preferred_daypart, activity, join_day) -> _Schedule:
    n_sessions = 1 + rng.poisson(config.mean_sessions * activity)
    S = int(n_sessions.sum())
    s_user = np.repeat(np.arange(n_users), n_sessions)
    s_day = join_day[s_user] + rng.random(S) * (config.days - join_day[s_user])
    s_mood = _sample_rows(rng, weight[s_user])
    follow = rng.random(S) < config.context_fidelity
    s_device = np.where(follow, preferred_device[s_user, s_mood], rng.integers(0, len(DEVICES), S))
    s_daypart = np.where(follow, preferred_daypart[s_user, s_mood], rng.integers(0, len(DAYPARTS), S))
    s_hour = s_daypart * 6 + rng.integers(0, 6, S)
    start_us = pd.Timestamp(config.start, tz="UTC").value // 1000
    s_seconds = np.floor(s_day).astype(np.int64) * 86_400 + s_hour * 3600 + rng.integers(0, 3600, S)
    s_ts = start_us + s_seconds * 10**6 + rng.integers(0, 10**6, S)  # int64 microseconds: exact
    order = np.lexsort((s_ts, s_user))
    s_user, s_ts, s_mood, s_device, s_daypart, s_hour = (a[order] for a in (s_user, s_ts, s_mood, s_device, s_daypart, s_hour))
    s_shift = rng.random(S) < config.interest_shift
    s_shift_slot = _sample_rows(rng, weight[s_user])
    s_shift_category = rng.integers(0, config.n_categories, S)
    n_requests = 1 + rng.poisson(config.mean_requests_per_session - 1.0, size=S)
    # requests, flat, in (user, time) order
    r_session = np.repeat(np.arange(S), n_requests)
    r_first = np.concatenate([[True], r_session[1:] != r_session[:-1]])
    gaps = rng.exponential(90e6, size=len(r_session)).astype(np.int64) + 10**6
    cum = np.cumsum(gaps)
    within = cum - np.repeat(cum[r_first], n_requests)  # 0 at each session's first request
    r_user = s_user[r_session]
    # Strictly increasing times per user (a long session may run into the next one): t_i = max(t_i, t_{i-1} + 1us).
    rel = s_ts[r_session] + within - start_us
    big = int(rel.max()) + len(rel) + 1
    idx = np.arange(len(rel))
    r_ts = np.maximum.accumulate(rel - idx + r_user * big) + idx - r_user * big + start_us
    rank = np.arange(len(r_user)) - np.repeat(np.searchsorted(r_user, np.arange(n_users)), np.bincount(r_user, minlength=n_users))
    keep = rank < config.max_requests_per_user
    r_session, r_first, r_ts, r_user, rank = (a[keep] for a in (r_session, r_first, r_ts, r_user, rank))
    R = int(rank.max()) + 1
    shape = (n_users, R)

    def grid(values, fill=0):
        out = np.full(shape, fill, dtype=np.asarray(values).dtype)
        out[r_user, rank] = values
        return out

    return _Schedule(
        valid=grid(np.ones(len(r_user), bool), False),
        ts_us=grid(r_ts),
        session=grid(r_session),
        first_in_session=grid(r_first, False),
        mood=grid(s_mood[r_session]),
        device=grid(s_device[r_session]),
        daypart=grid(s_daypart[r_session]),
        hour=grid(s_hour[r_session]),
        shift=grid(s_shift[r_session] & r_first, False),
        shift_slot=grid(s_shift_slot[r_session]),
        shift_category=grid(s_shift_category[r_session]),
    )


def simulate_chunk(config: SimulatorConfig, catalog: ItemCatalog, chunk_index: int, first_user: int, n_users: int,
                   truth: list[tuple[np.ndarray, ...]] | None = None) -> pa.Table:
    """Simulate `n_users` users (global indices first_user..) and return their impressions (not yet validated).

    truth: when a list, each request's hidden state is appended to it as (request key [n], target [n, D],
    sharpness [n], user bias [n], time [n]) per request slot (see `RequestTruth`); it draws no random numbers,
    so the impressions are the same with or without it."""
    rng = np.random.default_rng([config.seed, 2, chunk_index])
    interest_vec, weight, pref_device, pref_daypart, user_bias, activity, join_day = _make_users(rng, config, catalog, n_users)
    sched = _make_schedule(rng, config, n_users, weight, pref_device, pref_daypart, activity, join_day)
    S, L = config.slate_size, len(catalog.category)
    n_retrieved, n_popular = round(S * config.retrieved_share), round(S * config.popular_share)
    sharpness = np.asarray(config.sharpness)
    pop_cum = np.cumsum(np.exp(catalog.log_popularity))
    pop_z = (catalog.log_popularity - catalog.log_popularity.mean()) / catalog.log_popularity.std()

    last_clicked = np.full(n_users, -1)
    prev_clicked = np.zeros(n_users, dtype=bool)
    surface_grid = np.zeros(sched.valid.shape, dtype=np.int64)
    out = {k: [] for k in ("user", "req_r", "item", "position", "relevance", "p_click", "label")}
    for r in range(sched.valid.shape[1]):
        users = np.flatnonzero(sched.valid[:, r])
        if len(users) == 0:
            continue
        n = len(users)
        # drift at the start of each session: a small random walk, sometimes a whole new interest
        first = sched.first_in_session[users, r]
        fu = users[first]
        if len(fu):
            interest_vec[fu] = _unit(interest_vec[fu] + config.interest_drift * rng.normal(size=interest_vec[fu].shape))
            shifting = fu[sched.shift[fu, r]]
            slot = sched.shift_slot[shifting, r]
            new_cat = sched.shift_category[shifting, r]
            interest_vec[shifting, slot] = _unit(
                catalog.category_vectors[new_cat] + 0.3 * rng.normal(size=(len(shifting), config.latent_dim))
            )
            prev_clicked[fu] = False
        # surface: the first of a session is home or search; later ones depend on the previous click
        probs = np.where(prev_clicked[users, None], NEXT_SURFACE_AFTER_CLICK, NEXT_SURFACE_AFTER_NO_CLICK)
        probs = np.where(first[:, None], FIRST_SURFACE, probs)
        no_history = last_clicked[users] < 0
        probs[no_history, ITEM_DETAIL] = 0.0
        probs[no_history, CART] = 0.0
        surface = _sample_rows(rng, probs)
        surface_grid[users, r] = surface
        # target taste: the mood interest (home, search), the last clicked item (item_detail), its complement (cart)
        target = interest_vec[users, sched.mood[users, r]]
        last = last_clicked[users]
        detail = surface == ITEM_DETAIL
        target[detail] = catalog.latent[last[detail]]
        cart = surface == CART
        target[cart] = catalog.category_vectors[catalog.complement[catalog.category[last[cart]]]]
        # candidates: retrieved near the target, popular, random; only items already released
        cat_probs = np.exp(config.retrieval_sharpness * target @ catalog.category_vectors.T)
        cats = np.stack([_sample_rows(rng, cat_probs) for _ in range(n_retrieved)], axis=1)
        retrieved = _draw_in_categories(rng, catalog, cats)
        popular = np.searchsorted(pop_cum, rng.random((n, n_popular)) * pop_cum[-1], side="right").clip(max=L - 1)
        random_items = rng.integers(0, L, size=(n, S - n_retrieved - n_popular))
        slate = np.concatenate([retrieved, popular, random_items], axis=1)
        ts = sched.ts_us[users, r]
        for _ in range(100):  # replace unreleased and repeated items until the slate is clean
            unreleased = catalog.release_us[slate] > ts[:, None]
            srt = np.sort(slate, axis=1)
            has_dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
            dup = np.zeros_like(unreleased)
            if has_dup.any():
                sub = slate[has_dup]
                first_pos = np.argsort(sub, axis=1, kind="stable")
                sorted_sub = np.take_along_axis(sub, first_pos, axis=1)
                repeat_sorted = np.concatenate([np.zeros((len(sub), 1), bool), sorted_sub[:, 1:] == sorted_sub[:, :-1]], axis=1)
                repeat = np.zeros_like(repeat_sorted)
                np.put_along_axis(repeat, first_pos, repeat_sorted, axis=1)
                dup[has_dup] = repeat
            bad = unreleased | dup
            if not bad.any():
                break
            slate[bad] = rng.integers(0, catalog.n_initial, size=int(bad.sum()))
        # logging policy: noisy popularity order
        policy_score = catalog.log_popularity[slate] + rng.normal(0.0, 1.0, size=slate.shape)
        position = np.argsort(np.argsort(-policy_score, axis=1), axis=1)
        cos = np.einsum("nd,nsd->ns", target, catalog.latent[slate])
        logit = config.base_logit + sharpness[surface][:, None] * cos + 0.4 * pop_z[slate] + user_bias[users, None]
        relevance = 1.0 / (1.0 + np.exp(-logit))
        if truth is not None:
            truth.append(((first_user + users) * 1000 + r, target.copy(), sharpness[surface], user_bias[users].copy(), ts.copy()))
        p_click = relevance * examination(position, config.position_decay)
        label = rng.random(slate.shape) < p_click
        # state: did this request get a click, and which item was clicked (the top-most click)
        clicked_any = label.any(axis=1)
        top_click = np.argmin(np.where(label, position, S + 1), axis=1)
        last_clicked[users[clicked_any]] = slate[clicked_any, top_click[clicked_any]]
        prev_clicked[users] = clicked_any
        out["user"].append(np.repeat(users, S))
        out["req_r"].append(np.full(n * S, r))
        out["item"].append(slate.ravel())
        out["position"].append(position.ravel())
        out["relevance"].append(relevance.ravel())
        out["p_click"].append(p_click.ravel())
        out["label"].append(label.ravel())

    cols = {k: np.concatenate(v) for k, v in out.items()}
    u, r = cols["user"], cols["req_r"]
    global_user = first_user + u
    session = sched.session[u, r]
    request_key = pa.array(global_user * 1000 + r, pa.int64()).cast(pa.string())
    return pa.table(
        {
            "user_id": _prefixed_ids("u", global_user),
            "item_id": _prefixed_ids("i", cols["item"]),
            "ts": pa.array(sched.ts_us[u, r], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "label": pa.array(cols["label"].astype(np.int8)),
            "surface": pa.array(np.asarray(SURFACES, dtype=object)[surface_grid[u, r]], pa.string()),
            "device": pa.array(np.asarray(DEVICES, dtype=object)[sched.device[u, r]], pa.string()),
            "daypart": pa.array(np.asarray(DAYPARTS, dtype=object)[sched.daypart[u, r]], pa.string()),
            "hour": pa.array(sched.hour[u, r], pa.int64()),
            "position": pa.array(cols["position"], pa.int64()),
            "session_id": pc.binary_join_element_wise(
                pa.scalar(f"s{chunk_index}-"), pa.array(session, pa.int64()).cast(pa.string()), ""
            ),
            "request_id": pc.binary_join_element_wise(pa.scalar("r"), request_key, ""),
            "relevance": pa.array(cols["relevance"], pa.float64()),
            "p_click": pa.array(cols["p_click"], pa.float64()),
        }
    )


def generate(config: SimulatorConfig, truth: list[tuple[np.ndarray, ...]] | None = None) -> tuple[ItemCatalog, Iterator[pa.Table]]:
    """The catalog and an iterator of validated event chunks (users are disjoint across chunks); `truth`: see
    `simulate_chunk`."""
    catalog = make_catalog(config)
    start = pd.Timestamp(config.start, tz="UTC")
    options = ValidationOptions(min_ts=start, max_ts=start + pd.Timedelta(days=config.days + 1))

    def chunks() -> Iterator[pa.Table]:
        for index, first_user in enumerate(range(0, config.n_users, config.chunk_users)):
            n = min(config.chunk_users, config.n_users - first_user)
            raw = simulate_chunk(config, catalog, index, first_user, n, truth)
            yield validate_events(raw, SIMULATOR_CONTRACT, source=f"simulator chunk {index}", options=options).events

    return catalog, chunks()


def simulate(config: SimulatorConfig) -> tuple[pa.Table, pa.Table]:
    """Events and items in memory (for tests and small presets)."""
    catalog, chunks = generate(config)
    return pa.concat_tables(list(chunks)), catalog.table()


@dataclass
class RequestTruth:
    """What the simulator knew at every request: enough for the true relevance of any item there, not only of the
    items the logging policy showed (what a retrieval A/B needs). Truth: never a feature.

    request_ids [Q] (the events' request_id), target [Q, D] the taste the request was about, sharpness [Q] its
    surface's, user_bias [Q], ts_us [Q]; the catalogue's latent [I, D], popularity z-score [I], release_us [I].
    """

    request_ids: np.ndarray
    target: np.ndarray
    sharpness: np.ndarray
    user_bias: np.ndarray
    ts_us: np.ndarray
    latent: np.ndarray
    pop_z: np.ndarray
    release_us: np.ndarray
    base_logit: float

    def index_of(self, request_ids: np.ndarray) -> np.ndarray:
        """[N] positions of the given request ids (a KeyError names an unknown one)."""
        position = pd.Series(np.arange(len(self.request_ids)), index=self.request_ids)
        missing = ~pd.Index(request_ids).isin(position.index)
        if missing.any():
            raise KeyError(f"request ids not simulated: {', '.join(map(str, np.asarray(request_ids)[missing][:5]))}")
        return position[request_ids].to_numpy()

    def relevance(self, requests: np.ndarray, items: np.ndarray) -> np.ndarray:
        """requests [N] (positions), items [N, M] item indices -> [N, M] true click probability if examined."""
        cos = np.einsum("nd,nmd->nm", self.target[requests], self.latent[items])
        logit = self.base_logit + self.sharpness[requests, None] * cos + 0.4 * self.pop_z[items] + self.user_bias[requests, None]
        return 1.0 / (1.0 + np.exp(-logit))

    def best_items(self, requests: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
        """[N, k] the k most relevant items released by each request's time, best first."""
        out = []
        for start in range(0, len(requests), chunk):
            req = requests[start : start + chunk]
            logit = self.sharpness[req, None] * (self.target[req] @ self.latent.T) + 0.4 * self.pop_z[None, :]  # monotone in relevance
            logit[self.release_us[None, :] > self.ts_us[req, None]] = -np.inf
            top = np.argpartition(-logit, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(logit, top, axis=1), axis=1, kind="stable")
            out.append(np.take_along_axis(top, order, axis=1))
        return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def simulate_with_truth(config: SimulatorConfig) -> tuple[pa.Table, pa.Table, RequestTruth]:
    """`simulate(config)` (the same events) and every request's `RequestTruth`."""
    parts: list[tuple[np.ndarray, ...]] = []
    catalog, chunks = generate(config, parts)
    events = pa.concat_tables(list(chunks))
    keys, target, sharpness, user_bias, ts = (np.concatenate([p[i] for p in parts]) for i in range(5))
    pop_z = (catalog.log_popularity - catalog.log_popularity.mean()) / catalog.log_popularity.std()
    truth = RequestTruth(np.char.add("r", keys.astype(str)).astype(object), target, sharpness, user_bias, ts, catalog.latent, pop_z,
                         catalog.release_us, config.base_logit)
    return events, catalog.table(), truth


def simulate_to_run(config: SimulatorConfig, paths: RunPaths, progress: bool = True) -> dict:
    """Stream the simulation into the run folder chunk by chunk (bounded memory); returns dataset.json's content."""
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    paths.dataset_info.unlink(missing_ok=True)
    catalog, chunks = generate(config)
    write_parquet_atomic(catalog.table(), paths.items)
    n_events = 0
    n_chunks = -(-config.n_users // config.chunk_users)
    # the events file is renamed into place once its writer has closed it
    with atomic_path(paths.events) as tmp, pq.ParquetWriter(tmp, SIMULATOR_CONTRACT.arrow_schema()) as writer:
        bar = tqdm(chunks, total=n_chunks, desc="simulating users", unit="chunk", disable=bars_off(progress))
        for table in bar:
            writer.write_table(table)
            n_events += table.num_rows
            bar.set_postfix(events=f"{n_events:,}")
    paths.quarantine.unlink(missing_ok=True)
    return write_dataset_info(
        paths,
        source={"name": "simulator", "config": asdict(config)},
        contract=SIMULATOR_CONTRACT,
        coercions=[],
        n_events=n_events,
        n_items=len(catalog.category),
        n_rejected=0,
    )


def preset(name: str, **overrides) -> SimulatorConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown simulator preset '{name}': expected one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
