"""Online side: materialization into SQLite or Redis, and lookups for an existing ranking stack.

`get_ranking_features(user_id, conditions, candidate_item_ids)` answers one ranking request with arrays the
ranker takes as they are: the K user-interest vectors [K, D], the N candidates' LUM vectors [N, D], counters,
the recent-items history, and a found-mask for each. Unknown users or items give zeros/NaN and a False in the
mask, never an exception. The same request goes through Feast's Python SDK or its HTTP server (`feast serve`).

Freshness and TTL. `materialize()` writes the newest value of every entity up to the newest timestamp the
offline data holds (incrementally after the first run), so the online store answers with the newest snapshot
of the selected model version. Feast does not apply a feature view's TTL on online reads (feast-dev/feast#1802,
#6821), so this client does: a user-interest vector older than `lum_ttl_days` before the request time is
treated as missing (`stale` in the answer). The request time defaults to the store's clock: the newest time
the online store was materialized up to (in production, now). The online store keeps only the newest vector,
so one stamped after the request time is never served: historical requests belong to the offline store.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from contracts import names
from contracts.names import lum_user_column
from feature_store.materialize import MaterializeInProgress, consistent_lookup, materialize, materialize_in_progress  # noqa: F401
from feature_store.repo import FeatureRepo, FeatureStoreError

USER_COUNTERS = list(names.USER_STATS_COLUMNS)  # as Feast's user_stats view holds them (the last event's time last)
ITEM_COUNTERS = list(names.ITEM_COUNTERS)
TIMESTAMP_SUFFIX = "__ts"
ITEM_VIEW_PREFIXES = ("item_stats__", "item_info__", "lum_item__")  # the item-keyed views: what the client caches


# materialization: feature_store/materialize.py (`materialize` is re-exported here; a full run is swapped in
# atomically, and lookups that overlap it are retried or refused with MaterializeInProgress)


# ---------------------------------------------------------------------- the answer
@dataclass
class RankingFeatures:
    """Features of one ranking request: a user, K query conditions, N candidate items.

    Arrays are ready for the ranker: missing values are zeros (vectors) or NaN (counters) with a False in the
    matching `*_found` mask.
    """

    user_id: str
    conditions: list[str]
    item_ids: list[str]
    request_time: pd.Timestamp
    model_version: str | None
    user_vectors: np.ndarray  # [K, D] float32
    user_vector_found: np.ndarray  # [K] bool
    user_vector_stale: np.ndarray  # [K] bool: found but older than the TTL (then not used)
    user_vector_as_of: list[pd.Timestamp | None]  # [K]
    item_vectors: np.ndarray  # [N, D] float32
    item_vector_found: np.ndarray  # [N] bool
    user_counters: dict[str, float]  # NaN when the user is unknown
    user_found: bool
    item_counters: dict[str, np.ndarray]  # each [N] float64, NaN when unknown
    item_found: np.ndarray  # [N] bool
    item_category: list[str | None]  # [N]
    hist_item_ids: list[str] = field(default_factory=list)
    hist_categories: list[str] = field(default_factory=list)
    hist_ts: list[float] = field(default_factory=list)  # seconds since the epoch of each history item's event

    def to_table(self, context: dict[str, Any] | None = None) -> pa.Table:
        """One row per candidate in the training-set contract (what `build_training_set` returns offline), as an
        Arrow table with the contract metadata in its schema (what the ranker reads without a pandas round trip)."""
        from feature_store.training_set import METADATA_KEY, contract_metadata

        n = len(self.item_ids)
        columns: dict[str, pa.Array] = {
            "row_id": pa.array(np.arange(n, dtype=np.int64)),
            "user_id": pa.array([self.user_id] * n, pa.string()),
            "item_id": pa.array(self.item_ids, pa.string()),
            "ts": pa.array(np.full(n, self.request_time.value, dtype="datetime64[ns]"), pa.timestamp("ns", tz="UTC")),
        }
        for name, value in (context or {}).items():
            columns[name] = pa.array([value] * n)
        columns["item_category"] = pa.array(self.item_category, pa.string())
        for name in USER_COUNTERS[:-1]:
            columns[name] = pa.array(np.full(n, self.user_counters[name], dtype=np.float64))
        since = (self.request_time - pd.Timestamp("1970-01-01", tz="UTC")).total_seconds() - self.user_counters["user_last_event_s"]
        columns["user_hours_since_last"] = pa.array(np.full(n, since / 3600.0, dtype=np.float64))
        for name in ITEM_COUNTERS:
            columns[name] = pa.array(np.asarray(self.item_counters[name], dtype=np.float64))
        columns["hist_item_ids"] = pa.array([list(self.hist_item_ids)] * n, pa.list_(pa.string()))
        columns["hist_categories"] = pa.array([list(self.hist_categories)] * n, pa.list_(pa.string()))
        columns["hist_ts"] = pa.array([[float(t) for t in self.hist_ts]] * n, pa.list_(pa.float64()))
        for k, condition in enumerate(self.conditions):
            columns[lum_user_column(condition)] = _vector_rows(np.tile(self.user_vectors[k], (n, 1)), np.full(n, bool(self.user_vector_found[k])))
        if self.model_version:  # a store without LUM vectors (no version ingested yet) has no LUM columns, as offline
            columns["lum_item"] = _vector_rows(self.item_vectors, self.item_vector_found)
        columns["missing_user_stats"] = pa.array(np.full(n, not self.user_found, dtype=np.int8))
        columns["missing_item_stats"] = pa.array((~self.item_found).astype(np.int8))
        if self.model_version:
            columns["missing_lum"] = pa.array(((~self.item_vector_found) | (not self.user_vector_found.all())).astype(np.int8))
        dim = self.user_vectors.shape[1] if self.model_version else None
        meta = contract_metadata(columns, (context or {}).keys(), self.conditions, dim, self.model_version, None)
        return pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})

    def to_frame(self, context: dict[str, Any] | None = None) -> pd.DataFrame:
        """`to_table` as a DataFrame, its metadata in `frame.attrs["lum.training_set"]`."""
        from feature_store.training_set import METADATA_KEY

        table = self.to_table(context)
        frame = table.to_pandas()
        frame.attrs[METADATA_KEY.decode()] = json.loads(table.schema.metadata[METADATA_KEY])
        return frame


def _vector_rows(vectors: np.ndarray, found: np.ndarray) -> pa.Array:
    """[N, D] float32 vectors as a list<float> column, null where not `found`."""
    n, d = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(~np.asarray(found, dtype=bool)))


# ---------------------------------------------------------------------- transports
class _PythonTransport:
    """Feast's Python SDK against the repo's online store (SQLite or Redis)."""

    def __init__(self, repo: FeatureRepo):
        self.store = repo.store()

    def read(self, features: list[str], entities: dict[str, list[str]]) -> dict[str, list[Any]]:
        response = self.store.get_online_features(features=features, entity_rows=entities, full_feature_names=True)
        return _response_values(response.proto)


class _DirectTransport:
    """The same reads through Feast's provider (`online_read`), the layer `get_online_features` itself calls,
    without its per-request response assembly (entity protos, status vectors, Timestamp protos): about a third
    of the latency of a 100-candidate request. Answers in the same form as `_PythonTransport`."""

    def __init__(self, repo: FeatureRepo):
        self.store = repo.store()
        self.provider = self.store._get_provider()
        self.views: dict[str, Any] = {}

    def _view(self, name: str) -> Any:
        if name not in self.views:
            self.views[name] = self.store.get_feature_view(name)
        return self.views[name]

    def read(self, features: list[str], entities: dict[str, list[str]]) -> dict[str, list[Any]]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        by_view: dict[str, list[str]] = {}
        for ref in features:
            view, name = ref.split(":")
            by_view.setdefault(view, []).append(name)
        rows = len(next(iter(entities.values())))
        out: dict[str, list[Any]] = {}
        for view_name, view_features in by_view.items():
            view = self._view(view_name)
            keys = [c.name for c in view.entity_columns]
            tuples = list(zip(*(entities[k] for k in keys)))
            unique = list(dict.fromkeys(tuples))
            protos = [EntityKey(join_keys=keys, entity_values=[Value(string_val=v) for v in t]) for t in unique]
            read = self.provider.online_read(config=self.store.config, table=view, entity_keys=protos, requested_features=view_features)
            # convert each distinct key's answer once (a request repeats keys to pad its rows)
            decoded: dict[tuple, tuple[int, dict[str, Any]]] = {}
            for key, (stamp, data) in zip(unique, read):
                if data is None:
                    decoded[key] = (0, {})
                    continue
                seconds = int((stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()) if stamp else 0
                decoded[key] = (seconds, {n: _proto_value(v) for n, v in data.items()})
            answers = [decoded[t] for t in tuples]
            for name in view_features:
                out[f"{view_name}__{name}"] = [values.get(name) for _, values in answers]
                out[f"{view_name}__{name}{TIMESTAMP_SUFFIX}"] = [seconds if name in values else 0 for seconds, values in answers]
        assert all(len(v) == rows for v in out.values())
        return out


class _HttpTransport:
    """`feast serve`'s `POST /get-online-features` (see README: the request is the same JSON)."""

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.session = requests.Session()
        # `feast serve` restarts its workers now and then: a refused or reset connection (or a 502/503/504 on the
        # way) is tried again after 0.1, 0.2, 0.4 s. The request only reads, so repeating the POST is safe.
        retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=0.1,
                      status_forcelist=(502, 503, 504), allowed_methods=None, raise_on_status=False)
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))

    def read(self, features: list[str], entities: dict[str, list[str]]) -> dict[str, list[Any]]:
        body = {"features": features, "entities": entities, "full_feature_names": True}
        reply = self.session.post(f"{self.url}/get-online-features", json=body, timeout=self.timeout_s)
        if reply.status_code != 200:
            raise FeatureStoreError(f"{self.url}/get-online-features answered {reply.status_code}: {reply.text[:500]}")
        payload = reply.json()
        names = payload["metadata"]["feature_names"]
        out: dict[str, list[Any]] = {}
        for name, result in zip(names, payload["results"]):
            present = [s == "PRESENT" for s in result.get("statuses", ["PRESENT"] * len(result["values"]))]
            out[name] = [v if ok else None for v, ok in zip(result["values"], present)]
            stamps = result.get("event_timestamps") or [None] * len(result["values"])
            out[name + TIMESTAMP_SUFFIX] = [pd.Timestamp(s).timestamp() if s and ok else 0 for s, ok in zip(stamps, present)]
        return out


class FeatureClient:
    """Online feature lookups for a ranking stack.

    >>> client = FeatureClient("runs/demo/feature_repo")                      # Python SDK, SQLite or Redis
    >>> client = FeatureClient("runs/demo/feature_repo", http_url="http://127.0.0.1:6566")   # feast serve
    >>> answer = client.get_ranking_features("u42", ["surface=home"], ["i1", "i2", "i3"])
    """

    def __init__(self, repo: str | Path | FeatureRepo, http_url: str | None = None, sdk: bool = False,
                 item_cache: bool = True, item_cache_size: int = 200_000):
        """`http_url`: ask a running `feast serve`; `sdk`: Feast's `get_online_features` instead of the direct
        provider read (the same answers, slower; kept as the reference).

        `item_cache`: keep the candidates' features (item counters, category, LUM item vector) in this process
        between requests, up to `item_cache_size` items. The online store only changes when it is materialized,
        and every request first checks the repo's materialization record (one `stat`): when it changed, the cache
        is emptied and the store's clock re-read, so a cached answer is always the one the store would give.
        User features are never cached.

        One client may be shared by threads (a web server's worker pool): the cache and the re-read of the
        materialization record are guarded by a lock, which is never held during a store read."""
        self.repo = repo if isinstance(repo, FeatureRepo) else FeatureRepo(repo)
        if not self.repo.materialized_file.exists():
            raise FeatureStoreError(f"{self.repo.root}: the online store was never materialized; run `lum features materialize`")
        self.item_cache_size = item_cache_size if item_cache else 0
        self._item_rows: dict[str, dict[str, Any]] = {}  # item id -> its answer, for every item-keyed feature
        self._state_stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()  # guards _item_rows, _generation and the settings _refresh sets
        self._generation = 0  # +1 whenever the cache is emptied: a read begun before must not refill it
        self._refresh()
        if http_url:
            self.transport: Any = _HttpTransport(http_url)
        else:
            self.transport = _PythonTransport(self.repo) if sdk else _DirectTransport(self.repo)

    def _refresh(self) -> None:
        """Re-read the materialization record (the store's clock) and the repo settings (selected version,
        conditions, TTL), and drop cached items, whenever the record changed: a materialization happened."""
        with self._lock:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        info = self.repo.materialized_file.stat()
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._state_stamp:
            settings = self.repo.settings()  # the selected version may have changed with it
            self.model_version: str | None = settings.get("model_version")
            self.conditions: list[str] = list(settings.get("conditions") or [])
            self.dim = int(settings.get("lum_dim") or 0)
            self.ttl = pd.Timedelta(days=float(settings.get("lum_ttl_days") or 0))
            self.state = json.loads(self.repo.materialized_file.read_text())
            self.clock = pd.Timestamp(self.state["end"])
            self._item_rows.clear()
            self._generation += 1
            self._state_stamp = stamp

    def _read(self, user: str, conditions: list[str], items: list[str], model_version: str | None, generation: int) -> dict[str, list[Any]]:
        """One store read for the user's views and the items not cached; item answers come back in `items` order.

        The cached rows are taken in one step under the lock (another thread may evict them right after), and
        the fresh ones are cached only when no materialization emptied the cache since `generation`."""
        distinct = list(dict.fromkeys(items))
        cached: dict[str, dict[str, Any]] = {}
        if self.item_cache_size:
            with self._lock:
                if generation == self._generation:
                    cached = {i: self._item_rows[i] for i in distinct if i in self._item_rows}
        to_read = [i for i in distinct if i not in cached]
        got = self.transport.read(*self._one_read(user, conditions, to_read, model_version))
        item_names = [name for name in got if name.startswith(ITEM_VIEW_PREFIXES)]
        fresh = {item: {name: got[name][j] for name in item_names} for j, item in enumerate(to_read)}
        rows = {**cached, **fresh}
        if self.item_cache_size and fresh:
            with self._lock:
                if generation == self._generation:
                    for item, row in fresh.items():
                        if item not in self._item_rows and len(self._item_rows) >= self.item_cache_size:
                            self._item_rows.pop(next(iter(self._item_rows)))  # the oldest entry
                        self._item_rows[item] = row
        names = item_names or (list(next(iter(rows.values()))) if rows else [])
        for name in names:
            got[name] = [rows[i][name] for i in items]
        return got

    @consistent_lookup  # never a mix of the values before and after a full materialization (MaterializeInProgress)
    def get_ranking_features(
        self,
        user_id: str,
        conditions: list[str] | None,
        candidate_item_ids: list[str],
        request_time: pd.Timestamp | str | None = None,
        counters: Literal["as_of_request", "newest"] = "as_of_request",
    ) -> RankingFeatures:
        """Features for one request. `conditions=None` asks every query condition of the selected version.

        The online store holds each key's newest values only. For a `request_time` before a counter's newest value
        (a past request), that value would come from the request's future: `counters="as_of_request"` (the
        default) refuses such a request with a PastRequestError (a FeatureStoreError); `"newest"` takes the newest counters knowingly
        (a caller that only wants the time-checked vectors). Vectors are always time-checked.
        """
        with self._lock:  # one consistent view of the store's settings for the whole request
            self._refresh_locked()
            model_version, served, dim, ttl, clock, generation = self.model_version, self.conditions, self.dim, self.ttl, self.clock, self._generation
        conditions = list(served if conditions is None else conditions)
        unknown = [c for c in conditions if c not in served]
        if unknown:
            raise FeatureStoreError(f"condition(s) {', '.join(unknown)} are not served (served: {', '.join(served) or 'none'})")
        now = clock if request_time is None else pd.Timestamp(request_time)
        now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
        # ids are stored in Unicode NFC (the import normalises them): a decomposed spelling of an accent is the same id
        items = [names.normalize_id(str(i)) for i in candidate_item_ids]
        user = names.normalize_id(str(user_id))

        got = self._read(user, conditions, items, model_version, generation)
        if request_time is not None and counters == "as_of_request":
            _refuse_counters_after(got, now, user, items)
        user_counters = {c: _float(got[f"user_stats__{c}"][0]) for c in USER_COUNTERS}
        user_found = not np.isnan(user_counters["user_n_events"])
        hist_items = got["user_recent_items__hist_item_ids"][0] or []
        hist_cats = got["user_recent_items__hist_categories"][0] or []
        hist_ts = got["user_recent_items__hist_ts"][0]
        hist_ts = [] if hist_ts is None else [float(t) for t in hist_ts]  # Feast gives a float array as numpy

        n = len(items)
        item_counters = {c: np.array([_float(v) for v in got[f"item_stats__{c}"][:n]], dtype=np.float64) for c in ITEM_COUNTERS} if n else \
            {c: np.zeros(0) for c in ITEM_COUNTERS}
        item_found = ~np.isnan(item_counters["item_n_impressions"])
        item_category = list(got["item_info__item_category"][:n]) if n else []
        item_vectors = np.zeros((n, dim), np.float32)
        item_vector_found = np.zeros(n, bool)
        if model_version and n:
            for j, (vector, version) in enumerate(zip(got["lum_item__item_embedding"][:n], got["lum_item__item_model_version"][:n])):
                if vector is not None and version == model_version and len(vector) == dim:
                    item_vectors[j], item_vector_found[j] = vector, True

        k = len(conditions)
        user_vectors = np.zeros((k, dim), np.float32)
        found, stale = np.zeros(k, bool), np.zeros(k, bool)
        as_of: list[pd.Timestamp | None] = [None] * k
        if model_version and k:
            for j, (vector, version, stamp) in enumerate(zip(got["lum_user_interest__embedding"][:k], got["lum_user_interest__model_version"][:k],
                                                             got["lum_user_interest__embedding" + TIMESTAMP_SUFFIX][:k])):
                if vector is None or version != model_version:
                    continue
                as_of[j] = pd.Timestamp(stamp, unit="s", tz="UTC")
                if as_of[j] > now:  # computed after the request: never served (ask the offline store about the past)
                    continue
                if ttl > pd.Timedelta(0) and as_of[j] < now - ttl:
                    stale[j] = True
                    continue
                user_vectors[j], found[j] = vector, True
        return RankingFeatures(
            user_id=user, conditions=conditions, item_ids=items, request_time=now, model_version=model_version,
            user_vectors=user_vectors, user_vector_found=found, user_vector_stale=stale, user_vector_as_of=as_of,
            item_vectors=item_vectors, item_vector_found=item_vector_found, user_counters=user_counters, user_found=user_found,
            item_counters=item_counters, item_found=item_found, item_category=item_category,
            hist_item_ids=list(hist_items), hist_categories=list(hist_cats), hist_ts=list(hist_ts),
        )


    def _one_read(self, user: str, conditions: list[str], items: list[str], model_version: str | None) -> tuple[list[str], dict[str, list[str]]]:
        """One Feast read for the whole request: R = max(N, K, 1) entity rows carry the user in every row, the
        K conditions in rows 0..K-1 (then cycling) and the N items in rows 0..N-1 (then repeating the last).
        Feast reads each view once per distinct key, so the padding costs nothing, and one call instead of
        three saves two rounds of its per-call overhead (about a third of a request's latency)."""
        features = [f"user_stats:{c}" for c in USER_COUNTERS]
        features += ["user_recent_items:hist_item_ids", "user_recent_items:hist_categories", "user_recent_items:hist_ts"]
        rows = max(len(items), len(conditions), 1)
        entities: dict[str, list[str]] = {"user_id": [user] * rows}
        if items:
            features += [f"item_stats:{c}" for c in ITEM_COUNTERS] + ["item_info:item_category"]
            if model_version:
                features += ["lum_item:item_embedding", "lum_item:item_model_version"]
            entities["item_id"] = items + [items[-1]] * (rows - len(items))
        if model_version and conditions:
            features += ["lum_user_interest:embedding", "lum_user_interest:model_version"]
            entities["condition"] = [conditions[r % len(conditions)] for r in range(rows)]
        return features, entities


_PRESENT = 1  # feast.protos FieldStatus.PRESENT


def _proto_value(value: Any) -> Any:
    """A Feast `Value` proto as a Python value, for the types our views hold (a leaner `OnlineResponse.to_dict`,
    which spent about a quarter of a request converting 100 item vectors)."""
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    if kind == "float_list_val":
        return np.asarray(value.float_list_val.val, dtype=np.float32)
    if kind == "string_list_val":
        return list(value.string_list_val.val)
    if kind == "double_list_val":
        return np.asarray(value.double_list_val.val, dtype=np.float64)
    return getattr(value, kind)


def _response_values(proto: Any) -> dict[str, list[Any]]:
    """feature name -> values (None when not PRESENT), plus name + `__ts` -> event timestamps in seconds."""
    out: dict[str, list[Any]] = {}
    for name, vector in zip(proto.metadata.feature_names.val, proto.results):
        statuses = vector.statuses
        out[name] = [_proto_value(v) if statuses[i] == _PRESENT else None for i, v in enumerate(vector.values)]
        out[name + TIMESTAMP_SUFFIX] = [t.seconds for t in vector.event_timestamps]
    return out


# the views whose newest value per key the online store holds, and whose time says from when it is valid
_COUNTER_VIEWS = ("user_stats", "user_recent_items", "item_stats")


class PastRequestError(FeatureStoreError):
    """A request time before a counter's newest online value: answering would serve values from its future."""


def _refuse_counters_after(got: dict[str, list[Any]], now: pd.Timestamp, user: str, items: list[str]) -> None:
    """FeatureStoreError when a counter the request would use was written after `now` (see get_ranking_features)."""
    limit = now.timestamp()
    for key, stamps in got.items():
        view = key.split("__", 1)[0]
        if view not in _COUNTER_VIEWS or not key.endswith(TIMESTAMP_SUFFIX):
            continue
        for row, stamp in enumerate(stamps[: max(len(items), 1)] if view == "item_stats" else stamps[:1]):
            if stamp and float(stamp) > limit:
                whose = f"item {items[row]}" if view == "item_stats" else f"user {user}"
                raise PastRequestError(
                    f"the online store's {view} for {whose} is as of {pd.Timestamp(float(stamp), unit='s', tz='UTC')}, after the request time "
                    f"{now}: it holds the newest values only, so this past request would see counters from its future. Score past requests "
                    "with point-in-time features (`lum ranker score --source offline`), or ask without a request time for the newest values")


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)
