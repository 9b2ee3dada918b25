"""Is the online store really serving? The probe behind a ranking service's `GET /healthz`.

A materialization record says what was written, not what the online store holds now: a Redis that restarted
without its data, an emptied SQLite file or a store whose embedding job stopped weeks ago all keep the record. The
probe asks the store itself, through the same `FeatureClient` read a request makes, about keys that must be there:

- the *known user*: the user with the newest row of the `user_stats` offline source up to the record's end. Every
  materialization writes it, so "not found" means the store lost its data (or is not the one materialized);
- the *newest snapshot user*: the user with the newest LUM vector of the selected model version. Its vector must be
  found and within `lum_ttl_days` of the store's clock; when even the newest snapshot is older than the TTL, every
  user's vector is stale and LUM rankers score without their features (the daily embedding job stopped).

The keys are chosen from the offline sources once (`KnownKeys.find`, a read of three columns) and the probe itself is
one online read. Optionally the store's clock (its materialized-until time) is held to a wall-clock age.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from feature_store.materialize import materialize_in_progress
from feature_store.online import FeatureClient
from feature_store.repo import FeatureRepo, read_view_source


@dataclass(frozen=True)
class KnownKeys:
    """Keys the online store must hold after a materialization (None where the offline source is empty)."""

    user: str | None
    snapshot_user: str | None = None
    snapshot_condition: str | None = None

    @classmethod
    def find(cls, repo: FeatureRepo, end: pd.Timestamp | None = None) -> KnownKeys:
        """The newest `user_stats` user, and the user and condition of the newest LUM vector of the selected version,
        among the offline rows stamped at or before `end` (the materialized-until time: what is online)."""
        store = repo.store()
        user = _newest_key(read_view_source(store, "user_stats", ["user_id", "event_timestamp"]), ["user_id"], end)
        views = {fv.name for fv in store.list_feature_views()}
        snapshot = None
        if "lum_user_interest" in views:
            snapshot = _newest_key(read_view_source(store, "lum_user_interest", ["user_id", "condition", "event_timestamp"]),
                                   ["user_id", "condition"], end)
        return cls(user=user[0] if user else None, snapshot_user=snapshot[0] if snapshot else None,
                   snapshot_condition=snapshot[1] if snapshot else None)


def _newest_key(table: Any, keys: list[str], end: pd.Timestamp | None) -> list[str] | None:
    """The key columns of the row with the newest `event_timestamp` at or before `end` (None when there is none)."""
    if end is not None:
        stamps = table.column("event_timestamp")
        table = table.filter(pc.less_equal(stamps, pa.scalar(pd.Timestamp(end).to_pydatetime(), stamps.type)))
    if table.num_rows == 0:
        return None
    row = int(pc.index(table.column("event_timestamp"), pc.max(table.column("event_timestamp"))).as_py())
    return [str(table.column(k)[row].as_py()) for k in keys]


@dataclass
class StoreHealth:
    """The probe's answer: `ok`, and one sentence per problem (empty when ok)."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    clock: str | None = None  # the store's clock: its materialized-until time
    newest_snapshot: str | None = None  # the as-of time of the newest LUM vector found online

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "clock": self.clock, "newest_snapshot": self.newest_snapshot}


def probe_online_store(client: FeatureClient, keys: KnownKeys, max_clock_age: pd.Timedelta | None = None,
                       now: pd.Timestamp | None = None) -> StoreHealth:
    """One online read of the known keys (at the store's clock) and the checks described in the module docstring.

    `max_clock_age`: also fail when the store's clock is older than this before `now` (default: the wall clock), i.e.
    nothing was materialized for that long. Off by default: a replay or a demo serves a store whose data lies in the
    past on purpose."""
    problems: list[str] = []
    newest = None
    if materialize_in_progress(client.repo):  # the rows are being replaced: lookups are refused until the swap ends
        problems.append("a materialization is replacing the online store's rows (feature_store/materialize.py); requests get 503 until it ends")
        return StoreHealth(ok=False, problems=problems, clock=client.clock.isoformat())
    try:
        if keys.user is not None:
            answer = client.get_ranking_features(keys.user, [], [])
            if not answer.user_found:
                problems.append(f"the online store has no counters for user '{keys.user}', which the last materialization wrote: "
                                "the store lost its data or is not the one materialized (re-run `lum features materialize --full`)")
        if keys.snapshot_user is not None and keys.snapshot_condition in client.conditions:
            answer = client.get_ranking_features(keys.snapshot_user, [keys.snapshot_condition], [])
            as_of = answer.user_vector_as_of[0]
            newest = None if as_of is None else as_of.isoformat()
            if answer.user_vector_stale[0]:
                problems.append(f"the newest LUM vector (user '{keys.snapshot_user}', {keys.snapshot_condition}) is as of {newest}, older than "
                                f"the TTL ({client.ttl}) before the store's clock {client.clock.isoformat()}: every user's vector is stale "
                                "(has the daily embedding job stopped?)")
            elif not answer.user_vector_found[0]:
                problems.append(f"the online store has no LUM vector for user '{keys.snapshot_user}' ({keys.snapshot_condition}), which the last "
                                "materialization wrote: the store lost its data or is not the one materialized")
    except Exception as exc:  # noqa: BLE001 - whatever a broken store raises (sqlite3.OperationalError, a Redis
        # ConnectionError, ...) is the answer here, not a crash of the health check
        problems.append(f"the online store cannot be read: {type(exc).__name__}: {exc}")
    if max_clock_age is not None:
        age = (now or pd.Timestamp.now(tz="UTC")) - client.clock
        if age > max_clock_age:
            problems.append(f"the store's clock {client.clock.isoformat()} is {age} old, more than the allowed {max_clock_age}: "
                            "nothing was materialized since")
    return StoreHealth(ok=not problems, problems=problems, clock=client.clock.isoformat(), newest_snapshot=newest)
