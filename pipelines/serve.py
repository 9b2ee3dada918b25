"""The ranking service: a trained ranker of a run, fed from the Feast online store, behind `POST /rank`.

    lum serve --run runs/demo [--model lightgbm] [--variant lum] [--host 127.0.0.1] [--port 8000]

    POST /rank   {"user_id": "u7", "context": {"surface": "home", "device": "mobile", "daypart": "evening", "hour": 20},
                  "item_ids": ["i1", "i2"], "request_time": null, "return_inputs": false}
              -> {"scores": [...], "item_ids": [...], "model": "lightgbm", "variant": "lum", "ranker": "global-lightgbm-lum",
                  "model_version": "...", "request_time": "...", "features": {"user_found": true, "items_found": 2, ...}}
    GET /healthz  200 when the online store answers for keys it must hold (feature_store/health.py), else 503 with
                  the problems; with the ranker, model version, online store kind, materialized-until time
    GET /spec     the ranker's model_spec.json (inputs, order, transforms, missing values; see ranker/export.py)
    GET /metrics  Prometheus metrics: requests by endpoint and status, latency, requests scored without features

Requests are checked before any work: unknown fields, context values of the wrong type (a ranker's context column
holds integers or text, as its training vocabulary did), ids over MAX_ID_BYTES (the import's limit) and bodies over
`max_body_bytes` are refused (422 / 413) with what was wrong, never the whole body echoed back.

One feature path for training, offline scoring and online scoring: a request's features come from
`FeatureClient.get_ranking_features` as rows in the training-set contract (`RankingFeatures.to_frame`), and the
ranker's own `featurize` (the FeaturePipeline it was trained with) turns them into model inputs. Nothing here
computes a feature.

Time. Without `request_time` the store's clock is used (the newest time it was materialized up to: in production,
now). A past `request_time` is answered only when every counter the request reads is as of that time or older;
otherwise the online store would serve values from the request's future, and the request is refused (HTTP 409,
the message names the view, the key and both times). Vectors stamped after the request time are never served.

Threads. The HTTP app runs `rank` in a thread pool; one `RankingService` (its FeatureClient, ranker and pipeline)
is shared by those threads.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from contracts.names import MAX_ID_BYTES
from feature_store.health import KnownKeys, StoreHealth, probe_online_store
from feature_store.online import FeatureClient, MaterializeInProgress, PastRequestError, RankingFeatures
from feature_store.repo import FeatureRepo, FeatureStoreError
from feature_store.stream import StreamInputError, push_events
from pipelines.paths import RunPaths
from ranker.export import SPEC_FILE, flat_inputs, model_spec
from ranker.features import DLRMInputs
from ranker.schema import RankerInputError, variant_parts
from ranker.train import TrainedRanker

MAX_CANDIDATES = 1000
MAX_BODY_BYTES = 1 << 20  # 1,000 candidates of 256-character ids fit in 300 kB; a body over 1 MiB is refused (413)
MAX_ERRORS_SHOWN = 10  # validation errors listed in a 422 answer (the rest counted)
PROBE_ID = "__lum_serve_probe__"


def _id_bytes(value: str) -> str:
    if len(value.encode()) > MAX_ID_BYTES:
        raise ValueError(f"an id is at most {MAX_ID_BYTES:,} UTF-8 bytes, as the import allows")
    return value


Id = Annotated[str, StringConstraints(max_length=MAX_ID_BYTES), AfterValidator(_id_bytes)]  # the import's limit on ids


class ServeError(ValueError):
    """The service cannot start (a missing ranker folder or online store, a spec that does not match)."""


class RankingError(ValueError):
    """A request the service answers with an error: `status` is its HTTP status (422 bad request, 409 past request,
    503 while a full materialization replaces the online store's values: retry shortly)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


MAX_EVENTS = 10_000  # events of one POST /events


class EventsRequest(BaseModel):
    """New behaviours for the real-time stream (`feature_store/stream.py`): the event-log contract's fields."""

    model_config = ConfigDict(extra="forbid")

    events: list[dict[str, str | int | float | bool | None]] = Field(
        min_length=1, max_length=MAX_EVENTS, description="each with user_id, item_id, ts (ISO time) and label (0 or 1)")


class RankRequest(BaseModel):
    """One ranking request: a user, the request context, the candidates. Unknown fields are refused: a misspelt
    `request_tme` would otherwise be ignored and a past request answered with the newest values."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id
    context: dict[str, str | int | float | bool | None] = Field(default_factory=dict,
                                                                description="the ranker's request-time context columns, e.g. surface, device, hour")
    item_ids: list[Id] = Field(min_length=1, max_length=MAX_CANDIDATES)
    request_time: str | None = Field(None, description="ISO time; default: the online store's clock (its materialized-until time)")
    return_inputs: bool = Field(False, description="also return the model inputs in the order of GET /spec")


@dataclass
class Ranked:
    """The in-process answer: what `/rank` returns (`body`), with the training-set rows and model inputs behind it."""

    body: dict[str, Any]
    features: RankingFeatures
    table: pa.Table  # the request's rows in the training-set contract (RankingFeatures.to_table)
    inputs: DLRMInputs | np.ndarray


def default_protocol_key(run_dir: str | Path) -> str:
    """The protocol key of the rankers `lum serve` picks by default: the run's first protocol's split (`global`)."""
    state = Path(run_dir) / "run_state.json"
    if not state.exists():
        raise ServeError(f"{run_dir} has no run_state.json (not a finished `lum run`?): pass --protocol, e.g. --protocol global")
    protocols = json.loads(state.read_text()).get("config", {}).get("protocols") or []
    if not protocols:
        raise ServeError(f"{state} lists no protocols: pass --protocol")
    return str(protocols[0]["split"])


def ranker_folder(run_dir: str | Path, model: str, variant: str, protocol: str | None = None) -> Path:
    """runs/<run>/rankers/<protocol>-<model>-<variant> (the protocol defaults to `default_protocol_key`)."""
    from pipelines.steps.rankers import ranker_dir

    return ranker_dir(RunPaths(Path(run_dir)), protocol or default_protocol_key(run_dir), model, variant)


_INTEGER = re.compile(r"-?[0-9]+")


def context_kinds(vocabularies: dict[str, list[str]], columns: list[str]) -> dict[str, str]:
    """Per context column, what a request may send: `integer` where every training value was an integer (an `hour`),
    `text` where any was not (a `surface`), `any` for a column without a vocabulary. The ranker reads context values
    as vocabulary strings, so a wrong type would otherwise become an out-of-vocabulary id without a word."""
    kinds = {}
    for column in columns:
        values = vocabularies.get(column)
        kinds[column] = "any" if not values else "integer" if all(_INTEGER.fullmatch(v) for v in values) else "text"
    return kinds


def context_problems(context: dict[str, Any], kinds: dict[str, str], vocabularies: dict[str, list[str]]) -> list[str]:
    """One sentence per context value of the wrong type (null is always allowed: the explicit missing value)."""
    problems = []
    for column, value in context.items():
        if value is None:
            continue
        kind = kinds.get(column, "any")
        if isinstance(value, float) and not math.isfinite(value):
            ok = False
        elif kind == "integer":
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and bool(_INTEGER.fullmatch(value)))
        elif kind == "text":
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            seen = vocabularies.get(column) or []
            example = ", ".join(seen[:4]) + (", ..." if len(seen) > 4 else "")
            problems.append(f"context.{column}: expected {'an integer' if kind == 'integer' else 'text' if kind == 'text' else 'a finite value'} "
                            f"or null, got {json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)}"
                            + (f" (training values: {example})" if example else ""))
    return problems


def serves_rolling_features(repo: FeatureRepo) -> bool:
    """Whether the selected model version of a repo was ingested from a rolling embedding job (one vector per request
    time, computed offline from the request's own context): no batch job can produce those for a live request."""
    version = repo.settings().get("model_version")
    jobs = (repo.ingested().get(version) or {}).get("jobs", {}) if version else {}
    return any(job.get("mode") == "rolling" for job in jobs.values())


def _json_rows(array: np.ndarray) -> list:
    """A float array as JSON lists, NaN as null."""
    values = array.astype(np.float64)
    return np.where(np.isnan(values), None, values).tolist()


class RankingService:
    """Scores ranking requests with one trained ranker and the run's online store; `rank` is what `/rank` calls."""

    def __init__(self, ranker_dir: str | Path, repo: str | Path | FeatureRepo, client: FeatureClient | None = None,
                 spec_path: str | Path | None = None, threads: int | None = 1, allow_rolling: bool = False,
                 max_clock_age: pd.Timedelta | None = None):
        """`spec_path`: a model_spec.json to hold the ranker to (default: the ranker folder's own, else the one
        `ranker/export.py` makes from the ranker). The service refuses to start when the featurizer's inputs
        differ from the spec's, in names or order.

        `threads`: compute threads of one request's model call (LightGBM's `num_threads`; for a DLRM torch's
        thread count, which is process-wide, so set here). One is right for a server: requests run side by
        side, and a 100-candidate batch is too small to split (on 2 busy cores OpenMP's spinning threads made a
        DLRM call 100x slower). None leaves both libraries' defaults.

        `allow_rolling`: serve a LUM ranker from a repo of rolling features (refused by default: those vectors were
        computed per request offline, so online they are the newest of some earlier request, not this one's).
        `max_clock_age`: /healthz also fails when nothing was materialized for that long (feature_store/health.py)."""
        self.ranker_dir = Path(ranker_dir)
        if not (self.ranker_dir / "ranker.json").exists():
            raise ServeError(f"{self.ranker_dir} holds no trained ranker (no ranker.json): train it with `lum run` or `lum ranker train`")
        self.ranker = TrainedRanker.load(self.ranker_dir)
        self.threads = threads
        if threads and self.ranker.config.model == "dlrm":
            import torch

            torch.set_num_threads(threads)
        self.repo = repo if isinstance(repo, FeatureRepo) else FeatureRepo(repo)
        if not self.repo.materialized_file.exists():
            raise ServeError(f"{self.repo.root}: the online store was never materialized: run `lum features materialize --run RUN` (or `lum run`)")
        self.client = client or FeatureClient(self.repo)
        self._push_lock = threading.Lock()
        schema = self.ranker.schema
        self.context_columns = list(schema.context_columns)
        use_lum, _ = variant_parts(self.ranker.variant)
        self.conditions = list(schema.lum_conditions.values()) if use_lum else []
        if use_lum and not allow_rolling and serves_rolling_features(self.repo):
            raise ServeError(f"{self.repo.root} serves rolling LUM features (one vector per request, computed offline under the request's own "
                             "context): online they would be some earlier request's, so the ranker's lift does not carry over. Serve a "
                             "snapshot protocol's ranker, or pass --allow-rolling (a replay, a debugging session)")
        if use_lum:
            served = self.repo.settings()
            if schema.model_version and served.get("model_version") != schema.model_version:
                raise ServeError(f"{self.ranker_dir} was trained on LUM model version {schema.model_version}, but {self.repo.root} serves "
                                 f"{served.get('model_version')}: select that version (`lum features apply --model-version ...`) and materialize")
            missing = [c for c in self.conditions if c not in (served.get("conditions") or [])]
            if missing:
                raise ServeError(f"{self.repo.root} does not serve the condition(s) {', '.join(missing)} that {self.ranker_dir.name} reads")
        own = Path(spec_path) if spec_path else self.ranker_dir / SPEC_FILE
        self.spec = json.loads(own.read_text()) if own.exists() else model_spec(self.ranker)
        self.vocabularies = {name: list(v.values) for name, v in self.ranker.pipeline.vocabularies.items()}
        self.context_kinds = context_kinds(self.vocabularies, self.context_columns)
        self.check_spec()
        self.max_clock_age = max_clock_age
        self._known: tuple[str | None, KnownKeys] | None = None  # (materialized end, keys) for /healthz

    # ------------------------------------------------------------------ start-up check
    def check_spec(self) -> None:
        """Featurize a probe request through the whole online path; its inputs must be the spec's, in the spec's order."""
        ranked = self.rank({"user_id": PROBE_ID, "context": {c: None for c in self.context_columns}, "item_ids": [PROBE_ID]}, probe=True)
        inputs = ranked.inputs
        spec = self.spec
        problems = []
        if spec.get("model") != self.ranker.config.model or spec.get("variant") != self.ranker.variant:
            problems.append(f"the spec is for {spec.get('model')}/{spec.get('variant')}, the ranker is {self.ranker.config.model}/{self.ranker.variant}")
        elif isinstance(inputs, DLRMInputs):
            dense = [d["name"] for d in spec.get("dense", [])]
            sparse = [s["key"] for s in spec.get("sparse", [])]
            if inputs.dense.shape[1] != len(dense) or list(self.ranker.pipeline.dense_names) != dense:
                problems.append(f"dense inputs: the featurizer makes {inputs.dense.shape[1]} ({', '.join(self.ranker.pipeline.dense_names[:5])}, ...), "
                                f"the spec lists {len(dense)} ({', '.join(dense[:5])}, ...)")
            if list(inputs.keys) != sparse:
                problems.append(f"sparse keys: the featurizer makes {inputs.keys}, the spec lists {sparse}")
        else:
            schema, variant = self.ranker.schema, self.ranker.variant
            columns = schema.feature_columns(variant) + ([schema.time] if self.ranker.config.features.request_features else [])
            _, names = self.ranker.pipeline.lightgbm_inputs(ranked.table.select(columns))  # the names of the matrix featurize made
            features = [f["name"] for f in spec.get("features", [])]
            if inputs.shape[1] != len(features) or names != features or list(self.ranker.model.feature_name()) != features:
                first = next((i for i, (a, b) in enumerate(zip(names, features)) if a != b), min(len(names), len(features)))
                problems.append(f"features: the featurizer makes {inputs.shape[1]}, the spec lists {len(features)}; first difference at index {first}")
        vocabularies = self.vocabularies
        listed = {name: list(v["ids"]) for name, v in spec.get("vocabularies", {}).items()}
        if vocabularies != listed:
            problems.append(f"vocabularies differ: {sorted(k for k in set(vocabularies) | set(listed) if vocabularies.get(k) != listed.get(k))}")
        if problems:
            raise ServeError(f"{self.ranker_dir}: the ranker's inputs do not match its model spec: " + "; ".join(problems))

    # ------------------------------------------------------------------ requests
    def _request(self, request: RankRequest | dict[str, Any]) -> RankRequest:
        if isinstance(request, RankRequest):
            return request
        from pydantic import ValidationError

        try:
            return RankRequest.model_validate(request)
        except ValidationError as exc:
            raise RankingError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc

    def rank(self, request: RankRequest | dict[str, Any], probe: bool = False) -> Ranked:
        """Scores of one request's candidates, in their order (raises RankingError with the HTTP status to answer)."""
        started = time.perf_counter()
        request = self._request(request)
        missing = [c for c in self.context_columns if c not in request.context]
        unknown = [c for c in request.context if c not in self.context_columns]
        if missing or unknown:
            parts = ([f"missing context column(s) {', '.join(missing)}"] if missing else []) + \
                    ([f"unknown context column(s) {', '.join(unknown)}"] if unknown else [])
            raise RankingError(f"{'; '.join(parts)}: {self.ranker_dir.name} reads exactly {', '.join(self.context_columns) or 'none'}")
        wrong = context_problems(request.context, self.context_kinds, self.vocabularies)
        if wrong:
            raise RankingError("; ".join(wrong))
        when = None
        if request.request_time is not None:
            try:
                when = pd.Timestamp(request.request_time)
            except (ValueError, TypeError) as exc:
                raise RankingError(f"request_time '{request.request_time}' is not an ISO time: {exc}") from exc
            if pd.isna(when):
                raise RankingError(f"request_time '{request.request_time}' is not a time")
        try:
            answer = self.client.get_ranking_features(request.user_id, self.conditions, request.item_ids, request_time=when)
        except FeatureStoreError as exc:
            status = 409 if isinstance(exc, PastRequestError) else 503 if isinstance(exc, MaterializeInProgress) else 422
            raise RankingError(str(exc), status=status) from exc  # 503: a full materialization is replacing the store
        table = answer.to_table(dict(request.context))
        try:
            inputs = self.ranker.featurize(table)
        except RankerInputError as exc:
            raise RankingError(str(exc)) from exc
        scores = self.ranker.score(inputs, threads=self.threads)
        body: dict[str, Any] = {
            "scores": [float(s) for s in scores],
            "item_ids": list(answer.item_ids),
            "model": self.ranker.config.model,
            "variant": self.ranker.variant,
            "ranker": self.ranker_dir.name,
            "model_version": self.ranker.schema.model_version if self.conditions else None,
            "request_time": answer.request_time.isoformat(),
            "features": self.found(answer),
        }
        if request.return_inputs:
            body["inputs"] = self.inputs_json(inputs)
        body["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return Ranked(body, answer, table, inputs)

    @staticmethod
    def found(answer: RankingFeatures) -> dict[str, Any]:
        """What the online store knew: the user, the candidates, the LUM vectors per condition (found, stale, as-of)."""
        return {
            "user_found": bool(answer.user_found),
            "items_found": int(answer.item_found.sum()),
            "item_vectors_found": int(answer.item_vector_found.sum()),
            "history_len": len(answer.hist_item_ids),
            "lum": {c: {"found": bool(f), "stale": bool(s), "as_of": None if t is None else t.isoformat()}
                    for c, f, s, t in zip(answer.conditions, answer.user_vector_found, answer.user_vector_stale, answer.user_vector_as_of)},
        }

    def inputs_json(self, inputs: DLRMInputs | np.ndarray) -> dict[str, Any]:
        """The model inputs as GET /spec names them: LightGBM's `features` [N, F] (null = missing), or the DLRM's
        `dense` [N, F] float32, `values` [nnz] and `lengths` [K * N] int64 (key-major)."""
        if isinstance(inputs, DLRMInputs):
            dense, values, lengths = flat_inputs(inputs)
            return {"dense": _json_rows(dense.numpy()), "values": values.numpy().tolist(), "lengths": lengths.numpy().tolist()}
        return {"features": _json_rows(inputs)}

    def push(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """POST /events: one batch through the real-time stream, one batch at a time (each reads then writes a user's row)."""
        with self._push_lock:
            return push_events(self.repo, pd.DataFrame(events), source="POST /events")

    def store_health(self, end: str | None) -> StoreHealth:
        """The online store probed for keys it must hold (feature_store/health.py); the keys are re-chosen after each
        materialization (`end`: the materialization record's end)."""
        if self._known is None or self._known[0] != end:
            self._known = (end, KnownKeys.find(self.repo, None if end is None else pd.Timestamp(end)))
        return probe_online_store(self.client, self._known[1], self.max_clock_age)

    def health(self) -> dict[str, Any]:
        """GET /healthz: `status` ok or unavailable (the HTTP app answers 503), with the problems found."""
        state = json.loads(self.repo.materialized_file.read_text())
        store = self.store_health(state.get("end"))
        return {"status": "ok" if store.ok else "unavailable", "problems": store.problems, "ranker": self.ranker_dir.name,
                "model": self.ranker.config.model, "variant": self.ranker.variant,
                "model_version": self.ranker.schema.model_version if self.conditions else None,
                "online_store": state["online_store"]["kind"], "materialized_until": state["end"],
                "newest_snapshot": store.newest_snapshot, "online_model_version": state.get("model_version")}


# ---------------------------------------------------------------------- HTTP
class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before it is parsed (by its Content-Length,
    or while a chunked body streams in), so one request cannot make the server hold an unbounded body."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"the request body is over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"),
                                                                             (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received, refused = 0, False

        async def limited_receive() -> dict:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not refused:
                    refused = True
                    await self._refuse(send)
                    raise ValueError("request body too large")  # the app's own error answer is dropped below
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except ValueError:
            if not refused:
                raise


class ServiceMetrics:
    """Prometheus metrics of one app (its own registry, so two apps in a process do not collide): requests by
    endpoint and status, their latency, and requests scored without some features (an unknown user, missing or
    stale LUM vectors): the signal that the online store lost data while the service still answers 200."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lum_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("lum_request_seconds", "Time to answer a request", ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.missing = Counter("lum_rank_missing_features", "Ranked requests scored without some features, by kind",
                               ["kind"], registry=self.registry)
        self.healthy = Gauge("lum_online_store_healthy", "1 when the last /healthz probe of the online store passed", registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_features(self, found: dict[str, Any]) -> None:
        if not found["user_found"]:
            self.missing.labels("user").inc()
        if any(not c["found"] for c in found["lum"].values()):
            self.missing.labels("lum_user_vector").inc()


def _validation_answer(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """A 422 body naming each wrong field, never echoing its value (a 10,000-id list, a 1 MB id)."""
    listed = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in errors[:MAX_ERRORS_SHOWN]]
    return {"detail": listed, **({"more_errors": len(errors) - MAX_ERRORS_SHOWN} if len(errors) > MAX_ERRORS_SHOWN else {})}


def create_app(service: RankingService, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app of a service: POST /rank, POST /events, GET /healthz, GET /spec, GET /metrics."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI(title="lum ranking service", summary=f"{service.ranker_dir.name}, features from the Feast online store")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    metrics = ServiceMetrics()
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.requests.labels(request.url.path, "422").inc()  # refused before any work: no latency to record
        return JSONResponse(_validation_answer(list(exc.errors())), status_code=422)

    @app.post("/rank")
    def rank(request: RankRequest):  # a plain def: FastAPI runs it in its thread pool
        started = time.perf_counter()
        try:
            body = service.rank(request).body
        except RankingError as exc:
            metrics.observe("/rank", exc.status, time.perf_counter() - started)
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        metrics.observe("/rank", 200, time.perf_counter() - started)
        metrics.observe_features(body["features"])
        return body

    @app.post("/events")
    def events(request: EventsRequest):
        """Apply new behaviours to the online store (counters and recent behaviours), so the next /rank sees them."""
        started = time.perf_counter()
        try:
            answer = service.push(request.events)
        except StreamInputError as exc:
            metrics.observe("/events", 422, time.perf_counter() - started)
            return JSONResponse({"detail": str(exc)}, status_code=422)
        metrics.observe("/events", 200, time.perf_counter() - started)
        return answer

    @app.get("/healthz")
    def healthz():
        """200 when the online store answers for keys it must hold; 503 with the problems otherwise."""
        started = time.perf_counter()
        health = service.health()
        ok = health["status"] == "ok"
        metrics.healthy.set(1 if ok else 0)
        metrics.observe("/healthz", 200 if ok else 503, time.perf_counter() - started)
        return health if ok else JSONResponse(health, status_code=503)

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/spec")
    def spec():
        return service.spec

    return app


class BackgroundServer:
    """The app under a real uvicorn server in a thread of this process, on 127.0.0.1 (tests, benchmarks).

        with BackgroundServer(service) as server:
            requests.post(f"{server.url}/rank", json=...)
    """

    def __init__(self, service: RankingService, port: int | None = None, host: str = "127.0.0.1"):
        from feature_store.serve import free_port

        self.service, self.host, self.port = service, host, port or free_port()
        self.server: Any = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        import uvicorn

        config = uvicorn.Config(create_app(self.service), host=self.host, port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"lum-serve-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the ranking service did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def serve(service: RankingService, host: str = "127.0.0.1", port: int = 8000, access_log: bool = False,
          max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Serve until interrupted (Ctrl-C stops uvicorn cleanly: it finishes the requests in flight)."""
    import uvicorn

    uvicorn.run(create_app(service, max_body_bytes), host=host, port=port, log_level="info", access_log=access_log)
