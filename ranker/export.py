"""A trained ranker as files a non-Python ranking stack can serve: the model, and a JSON spec of its inputs.

    lum ranker export --ranker runs/demo/rankers/global-lightgbm-lum --out exported/

writes into `out`:

    model_spec.json   the model's inputs: names and order, how each is made from the raw feature columns (`compute`,
                      a machine-readable op per input; docs/deploy.md#input-transforms), what a missing value
                      becomes, the vocabularies (value -> id) and the standardisation of the dense block
    lightgbm.txt      LightGBM's native text model (any LightGBM binding loads it), or
    dlrm.pt2          the DLRM as a `torch.export` program: probabilities [B] from
                      dense [B, F] float32, values [nnz] int64, lengths [K * B] int64 (the KeyedJaggedTensor of the
                      sparse keys, key-major: every row's ids of key 0, then of key 1, ...); B (1 to 100,000) and
                      nnz are dynamic. The program holds aten operators only: `import torch` is all it needs
                      (no torchrec, no fbgemm_gpu).
    spec_reference.py the reference interpreter of the spec's `compute` ops (numpy and pandas only): the inputs
                      from the raw feature columns, to check a port against
    export.json       the manifest, written last: what the folder holds (a later export may replace exactly that)

`out` must be new, empty or an earlier export: a folder holding anything else is refused, never deleted.

`dlrm.pt2` is for a serving runtime (AOTInductor, ExecuTorch, or `torch.export.load(...).module()` in Python, after
`import torch` only); loading it in Python may unpickle its weights, so load only files you made.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from contracts.files import write_text_atomic
from contracts.names import HISTORY_CATEGORIES, HISTORY_ITEMS, HISTORY_TIMES, LUM_ITEM_COLUMN, LUM_USER_PREFIX, REQUEST_CONDITION
from ranker.din import AGE_EDGES_HOURS
from ranker.features import (
    FLAG_COLUMNS,
    OOV,
    REQUEST_COUNTERS,
    REQUEST_STATS,
    DLRMInputs,
    SparseFeature,
)
from ranker.schema import parse_condition
from ranker.train import TrainedRanker

SPEC_FILE = "model_spec.json"
DLRM_PROGRAM_FILE = "dlrm.pt2"
LIGHTGBM_MODEL_FILE = "lightgbm.txt"
SPEC_FORMAT = 1
# How to load each model file in Python, with exactly these imports (docs/deploy.md; tests/test_export.py loads
# the DLRM in a process that imports nothing else)
LOAD = {
    "dlrm": {"python_imports": ["torch"], "python": "torch.export.load('dlrm.pt2').module()(dense, values, lengths)"},
    "lightgbm": {"python_imports": ["lightgbm"], "python": "lightgbm.Booster(model_file='lightgbm.txt').predict(features)"},
}
MANIFEST_FILE = "export.json"  # written last: a folder holding it is a complete export
EXPORT_KIND = "lum-ranker-export"


class DLRMScorer(torch.nn.Module):
    """The DLRM on plain tensors: (dense [B, F] float32, values [nnz] int64, lengths [K * B] int64) -> [B] probabilities."""

    def __init__(self, model: torch.nn.Module, keys: list[str]):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        sparse = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=values, lengths=lengths)
        return torch.sigmoid(self.model(dense, sparse).squeeze(-1))


def flat_inputs(inputs: DLRMInputs, rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, values, lengths) of DLRMInputs, the exported program's arguments."""
    dense, sparse, _ = inputs.batch(rows)
    return dense, sparse.values(), sparse.lengths()


def _dense_transform(name: str, history_len: int) -> str:
    """How the pipeline makes one dense input from a training-set row (ranker/features.py), in words."""
    kind, _, rest = name.partition(":")
    if kind == "counter":
        return f"sign(x) * log1p(|x|) of the training-set column {rest}, then standardised"
    if kind == "flag":
        return f"the 0/1 flag {rest} as is (null counts as 1)" if rest in FLAG_COLUMNS else f"the 0/1 indicator {rest} as is"
    if name == "hist_len":
        return f"log1p(min(history length, {history_len})), then standardised"
    if kind == "lum_sim":
        return f"dot(user vector under condition {rest}, item vector), then standardised"
    if kind == "lum_cos":
        return f"cosine(user vector under condition {rest}, item vector), then standardised"
    if name in ("lum_sim_request", "lum_cos_request"):
        return f"the {name[4:7]} under the condition that matches the row's request context, then standardised"
    if kind in ("lum_user", "lum_item"):
        return f"component of the {kind[4:]} vector ({rest}), then standardised"
    if kind == "request":
        return f"{rest}: relative to the other candidates of the row's request (same user and time), then standardised"
    return "see ranker/features.py"


def _sparse_ids(feature: SparseFeature, history_len: int) -> str:
    """What the ids of one sparse key are, in words."""
    if feature.table is None:
        return (f"age bucket of each of the last {history_len} history items: 1 + the number of edges in hours "
                f"{list(AGE_EDGES_HOURS)} at or below (request time - hist_ts) / 3600")
    if feature.sequence:
        how = "one vector per position, target-attended" if feature.positional else "mean-pooled"
        return f"the last {history_len} items of the history, {how}"
    return "one id per row" + (" (the attention's target)" if feature.positional else "")


TARGET_AWARE_MEANINGS = {
    "din_sim_max": "max over the last history items of cosine(item factors of the target, of the history item); NaN when none",
    "din_sim_mean": "mean over the last history items of that cosine",
    "din_sim_last5": "mean of that cosine over the 5 newest history items",
    "din_category_count": "history items in the target's category",
    "din_hours_since_category": "hours from the newest history item in the target's category to the request; NaN when none",
    "din_hours_since_item": "hours from the newest engagement with the target item to the request; NaN when none",
    "din_category_share_last5": "share of the 5 newest history items in the target's category",
    "din_lm_sim_max": "max over the last history items of cosine(the target's LUM item vector, the history item's from "
                      "lm_item_vectors); NaN when none",
    "din_lm_sim_mean": "mean over the last history items of that LUM cosine",
    "din_lm_sim_last5": "mean of that LUM cosine over the 5 newest history items",
}


# ---------------------------------------------------------------------------------------------------- input ops
# Every model input gets `compute`: a small JSON expression over the raw feature columns (what Feast serves) that a
# non-Python stack can execute. The closed vocabulary of ops is documented in docs/deploy.md#input-transforms and
# executed by ranker/spec_reference.py (numpy and pandas only, shipped with each export); tests/test_export.py
# checks that it rebuilds the matrices ranker/features.py builds. A name below that no rule covers fails the
# export: a feature added to ranker/features.py must be described here before it can ship.

SPEC_REFERENCE_FILE = "spec_reference.py"


def _raw(column: str, null_as: float | None = None) -> dict[str, Any]:
    return {"op": "raw", "column": column} if null_as is None else {"op": "raw", "column": column, "null_as": null_as}


class _InputOps:
    """The `compute` of each model input of one ranker, by the names ranker/features.py gives them."""

    def __init__(self, ranker: TrainedRanker):
        self.schema, self.pipeline = ranker.schema, ranker.pipeline
        self.last = self.pipeline.config.history_len
        self.slugs = list(self.schema.lum_conditions)

    # ---- shared pieces
    def dot(self, slug: str) -> dict[str, Any]:
        return {"op": "dot", "a": LUM_USER_PREFIX + slug, "b": LUM_ITEM_COLUMN}

    def cosine(self, slug: str) -> dict[str, Any]:
        return {"op": "cosine", "a": LUM_USER_PREFIX + slug, "b": LUM_ITEM_COLUMN}

    def lum_score(self, name: str) -> dict[str, Any] | None:
        """lum_sim__s / lum_cos__s / lum_sim_request / lum_cos_request (LightGBM's and the request block's names)."""
        if name in ("lum_sim_request", "lum_cos_request"):
            per_condition = self.dot if name == "lum_sim_request" else self.cosine
            return {"op": "at_request_condition", "by_condition": [per_condition(s) for s in self.slugs]}
        kind, _, slug = name.partition("__")
        if slug in self.slugs and kind in ("lum_sim", "lum_cos"):
            return self.dot(slug) if kind == "lum_sim" else self.cosine(slug)
        return None

    def request_relative(self, name: str) -> dict[str, Any] | None:
        """`<value>__vs_request_mean|vs_request_max|request_rank` (features.py `_request_relative`)."""
        base, _, stat = name.rpartition("__")
        if stat not in REQUEST_STATS:
            return None
        if base in REQUEST_COUNTERS:
            value = _raw(base) if base.endswith("ctr") else {"op": "log1p", "of": _raw(base), "clip_min": 0.0}
        else:
            value = self.lum_score(base)
        return None if value is None else {"op": stat, "of": value}

    def missing_lum(self) -> dict[str, Any]:
        return {"op": "any_missing", "columns": [*self.schema.lum_user_columns, LUM_ITEM_COLUMN]}

    def history(self, op: str, list_column: str, **more: Any) -> dict[str, Any]:
        return {"op": op, "list": list_column, "last": self.last, **more}

    def similarity(self, reduce: str, newest: int | None, lm: bool) -> dict[str, Any]:
        target = {"vector_column": LUM_ITEM_COLUMN, "normalize": True} if lm else {"vectors": "item_factors", "key_column": self.schema.item}
        return self.history("history_similarity", HISTORY_ITEMS, newest=newest, reduce=reduce,
                            history_vectors="lm_item_vectors" if lm else "item_factors", target=target)

    # ---- LightGBM
    def lightgbm(self, name: str) -> dict[str, Any]:
        schema = self.schema
        if name in self.pipeline.lightgbm_categorical:
            return {"op": "vocabulary_id", "column": name, "vocabulary": name}
        if name in schema.counter_columns:
            return _raw(name)
        if name in FLAG_COLUMNS:
            return _raw(name, null_as=1.0)
        hours = {"times": HISTORY_TIMES, "request_time": schema.time}
        fixed = {
            # features.py `_history_numbers` reads the history's length from the categories list
            "hist_len": self.history("list_length", HISTORY_CATEGORIES),
            "hist_share_in_category": self.history("history_share_equal", HISTORY_CATEGORIES, equals=schema.category, newest=None),
            "hist_has_item": self.history("history_contains", HISTORY_ITEMS, equals=schema.item),
            "din_sim_max": self.similarity("max", None, lm=False),
            "din_sim_mean": self.similarity("mean", None, lm=False),
            "din_sim_last5": self.similarity("mean", 5, lm=False),
            "din_category_count": self.history("history_count_equal", HISTORY_CATEGORIES, equals=schema.category),
            "din_hours_since_category": self.history("hours_since_newest_equal", HISTORY_CATEGORIES, equals=schema.category, **hours),
            "din_hours_since_item": self.history("hours_since_newest_equal", HISTORY_ITEMS, equals=schema.item, **hours),
            "din_category_share_last5": self.history("history_share_equal", HISTORY_CATEGORIES, equals=schema.category, newest=5),
            "din_lm_sim_max": self.similarity("max", None, lm=True),
            "din_lm_sim_mean": self.similarity("mean", None, lm=True),
            "din_lm_sim_last5": self.similarity("mean", 5, lm=True),
            "missing_lum": self.missing_lum(),
        }
        if name in fixed:
            return fixed[name]
        found = self.lum_score(name) or self.request_relative(name) or self.vector_component(name, "__")
        if found is None:
            raise ValueError(f"model_spec: no input op describes the LightGBM feature '{name}': describe it in ranker/export.py")
        return found

    def vector_component(self, name: str, sep: str) -> dict[str, Any] | None:
        """lum_user__s__j / lum_item__j (LightGBM) or lum_user:s:j / lum_item:j (DLRM): one vector component."""
        parts = name.split(sep)
        if parts[0] == "lum_user" and len(parts) == 3 and parts[1] in self.slugs:
            return {"op": "component", "column": LUM_USER_PREFIX + parts[1], "index": int(parts[2])}
        if parts[0] == "lum_item" and len(parts) == 2:
            return {"op": "component", "column": LUM_ITEM_COLUMN, "index": int(parts[1])}
        return None

    # ---- DLRM
    def dense(self, name: str) -> dict[str, Any]:
        kind, _, rest = name.partition(":")
        found: dict[str, Any] | None = None
        if kind == "counter" and rest in self.schema.counter_columns:
            found = {"op": "signed_log1p", "of": _raw(rest)}
        elif kind == "flag" and rest in FLAG_COLUMNS:
            found = _raw(rest, null_as=1.0)
        elif name == "flag:lum_sim_request_missing":
            found = {"op": "is_missing", "of": self.lum_score("lum_sim_request")}
        elif name == "flag:missing_lum":
            found = self.missing_lum()
        elif name == "hist_len":
            found = {"op": "log1p", "of": self.history("list_length", HISTORY_ITEMS)}
        elif kind in ("lum_sim", "lum_cos"):
            found = self.lum_score(f"{kind}__{rest}")
        elif name in ("lum_sim_request", "lum_cos_request"):
            found = self.lum_score(name)
        elif kind == "request":
            found = self.request_relative(rest)
        else:
            found = self.vector_component(name, ":")
        if found is None:
            raise ValueError(f"model_spec: no input op describes the DLRM dense input '{name}': describe it in ranker/export.py")
        return found

    def sparse(self, feature: SparseFeature) -> dict[str, Any]:
        if feature.table is None:  # the behaviours' age buckets (ranker/din.py age_buckets)
            return {"op": "age_buckets_of_last", "times": feature.source, "last": self.last, "request_time": self.schema.time,
                    "edges_hours": list(AGE_EDGES_HOURS)}
        if feature.sequence:
            return {"op": "vocabulary_ids_of_last", "list": feature.source, "last": self.last, "vocabulary": feature.table}
        return {"op": "vocabulary_id", "column": feature.source, "vocabulary": feature.table}

    def request_condition(self) -> dict[str, Any]:
        """Which of the LUM conditions is a row's request condition (features.py `request_condition`)."""
        names = list(self.schema.lum_conditions.values())
        if REQUEST_CONDITION in names:
            return {"always": names.index(REQUEST_CONDITION)}
        allowed = set(self.schema.context_columns) | {self.schema.category}
        candidates = [{"index": k, "match": parse_condition(name)} for k, name in enumerate(names) if set(parse_condition(name)) <= allowed]
        return {"candidates": candidates,
                "rule": "the candidate whose every column equals the row's value (as text) with the most pairs; on a tie the "
                        "lower index; none: the value is missing"}


def model_spec(ranker: TrainedRanker) -> dict[str, Any]:
    """The JSON spec of a ranker's inputs (see the module docstring)."""
    pipeline = ranker.pipeline
    ops = _InputOps(ranker)
    vocabularies = {name: {"oov_id": OOV, "ids": {value: i + 1 for i, value in enumerate(v.values)}} for name, v in pipeline.vocabularies.items()}
    spec: dict[str, Any] = {
        "format": SPEC_FORMAT, "model": ranker.config.model, "variant": ranker.variant,
        "training_set_columns": {"user": ranker.schema.user, "item": ranker.schema.item, "time": ranker.schema.time,
                                 "lum_conditions": list(ranker.schema.lum_conditions)},
        "vocabularies": vocabularies,
        "output": "click probability in [0, 1]",
        # how to compute each input from the raw feature columns: `compute` of every input (docs/deploy.md#input-transforms)
        "ops": {"reference": SPEC_REFERENCE_FILE, "history_len": pipeline.config.history_len,
                "request_group": [ranker.schema.user, ranker.schema.time], "request_condition": ops.request_condition(),
                "text": "values are compared and looked up as text: strings as they are, integers in decimal, booleans "
                        "true/false; a null is never equal to anything and looks up the oov_id"},
    }
    if ranker.config.model == "dlrm":
        spec["file"] = DLRM_PROGRAM_FILE
        spec["inputs"] = [
            {"name": "dense", "dtype": "float32", "shape": ["B", len(pipeline.dense_names)],
             "missing": "0 (a missing value is 0 after standardisation)"},
            {"name": "values", "dtype": "int64", "shape": ["nnz"], "meaning": "the ids of every sparse key, key-major"},
            {"name": "lengths", "dtype": "int64", "shape": [f"{len(pipeline.sparse_features)} * B"], "meaning": "ids per row and key, key-major"},
        ]
        spec["dense"] = [{"index": i, "name": name, "mean": float(pipeline.dense_mean[i]), "std": float(pipeline.dense_std[i]),
                          "transform": _dense_transform(name, pipeline.config.history_len), "compute": ops.dense(name),
                          "then": "(x - mean) / std; a missing (NaN) or infinite result is 0"} for i, name in enumerate(pipeline.dense_names)]
        spec["sparse"] = [{"index": i, "key": f.key, "vocabulary": f.table, "column": f.source,
                           "ids": _sparse_ids(f, pipeline.config.history_len), "compute": ops.sparse(f)} for i, f in enumerate(pipeline.sparse_features)]
    else:
        names = list(ranker.model.feature_name())
        categorical = set(pipeline.lightgbm_categorical)
        spec["file"] = LIGHTGBM_MODEL_FILE
        spec["inputs"] = [{"name": "features", "dtype": "float32", "shape": ["B", len(names)], "missing": "NaN (LightGBM's own missing value)"}]
        spec["features"] = [{"index": i, "name": name, "categorical": name in categorical,
                             "transform": f"the id of the value in vocabularies.{name}" if name in categorical else
                             TARGET_AWARE_MEANINGS.get(name, "see compute"), "compute": ops.lightgbm(name)}
                            for i, name in enumerate(names)]
        if pipeline.item_factors is not None:  # what the din_sim_* cosines are computed from
            spec["item_factors"] = {"meaning": "unit-length item factors (SVD of the users' co-engagements before the fitting window)",
                                    **pipeline.item_factors.to_json()}
        if pipeline.lm_item_vectors is not None:  # the history items' side of the din_lm_sim_* cosines
            spec["lm_item_vectors"] = {"meaning": "unit-length LUM item vectors of the items the training rows held",
                                       **pipeline.lm_item_vectors.to_json()}
    return spec


def placeholder_inputs(ranker: TrainedRanker, rows: int = 4) -> DLRMInputs:
    """Rows to trace the DLRM with: dense zeros and the out-of-vocabulary id once per key and row (the values do not
    matter to tracing; the batch size and the number of ids stay dynamic)."""
    pipeline = ranker.pipeline
    keys = [f.key for f in pipeline.sparse_features]
    ids = [np.full(rows, OOV, dtype=np.int64) for _ in keys]
    offsets = [np.arange(rows + 1, dtype=np.int64) if f.sequence else None for f in pipeline.sparse_features]
    return DLRMInputs(torch.zeros(rows, len(pipeline.dense_names)), keys, ids, offsets, None)


class ExportError(ValueError):
    """An export that cannot be written: one line naming the folder and why (the CLI prints it as is)."""


def export_ranker(ranker: TrainedRanker, out_dir: str | Path, example: DLRMInputs | None = None) -> Path:
    """Writes the export to `out_dir`; a DLRM is traced on `example` (default: placeholders).

    `out_dir` may be new, empty, or an earlier export (its MANIFEST_FILE lists exactly what it holds); anything else
    is refused, so `--out` never deletes a user's files. The export is assembled in a unique hidden sibling folder
    and renamed into place only when complete; on any failure that folder is removed and the old export (if any)
    stays as it was. OS failures (read-only folder, full disk) become one ExportError line naming the path.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    except OSError as exc:
        raise _os_error(out_dir, exc) from None
    try:
        _write_export(ranker, staging, example)
        _swap_into_place(staging, out_dir)
    except BaseException as exc:  # BaseException: Ctrl-C leaves no half-written folder either
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _os_error(out_dir, exc) from None
        raise
    return out_dir


def _os_error(out_dir: Path, exc: OSError) -> ExportError:
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out_dir) else ""
    return ExportError(f"cannot write the export {out_dir}: {exc.strerror or exc}{where}")


def _check_replaceable(out_dir: Path) -> None:
    """Refuses an `out_dir` that is a file, or a non-empty folder other than an untouched earlier export."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"--out {out_dir}: is a file, not a folder")
    held = sorted(p.name for p in out_dir.iterdir())
    if not held:
        return
    manifest = out_dir / MANIFEST_FILE
    listed: Any = None
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            listed = data.get("files") if isinstance(data, dict) and data.get("kind") == EXPORT_KIND else None
        except (OSError, ValueError):
            listed = None
    if not isinstance(listed, list):
        raise ExportError(f"--out {out_dir}: the folder is not empty and is not an earlier ranker export (no valid "
                          f"{MANIFEST_FILE}); refusing to replace it: choose a new or empty folder")
    extra = [name for name in held if name not in set(listed) | {MANIFEST_FILE}]
    if extra:  # files someone put into an earlier export: replacing it would delete them
        raise ExportError(f"--out {out_dir}: the earlier export also holds {', '.join(extra[:5])} (not written by the "
                          f"export); refusing to replace it: move them away or choose another folder")


def _write_export(ranker: TrainedRanker, folder: Path, example: DLRMInputs | None) -> None:
    """The model file, model_spec.json, and last the manifest (what makes the folder an export)."""
    if ranker.config.model == "dlrm":
        program = export_dlrm(ranker, example if example is not None else placeholder_inputs(ranker))
        torch.export.save(program, folder / DLRM_PROGRAM_FILE)
    else:
        ranker.model.save_model(str(folder / LIGHTGBM_MODEL_FILE), num_iteration=ranker.model.best_iteration or None)
    spec = model_spec(ranker)
    write_text_atomic(json.dumps(spec, indent=1), folder / SPEC_FILE)
    shutil.copyfile(Path(__file__).with_name(SPEC_REFERENCE_FILE), folder / SPEC_REFERENCE_FILE)
    manifest = {"kind": EXPORT_KIND, "format": SPEC_FORMAT, "model": ranker.config.model, "variant": ranker.variant,
                "files": [spec["file"], SPEC_FILE, SPEC_REFERENCE_FILE], "load": LOAD[ranker.config.model],
                "built_with": {"torch": torch.__version__} if ranker.config.model == "dlrm" else {"lightgbm": lightgbm.__version__}}
    write_text_atomic(json.dumps(manifest, indent=1), folder / MANIFEST_FILE)


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Renames `staging` to `out_dir`. An existing `out_dir` (empty, or an earlier export) is first renamed aside,
    and put back if the second rename fails; both renames stay in one folder, so neither copies data."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}")
    out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    try:
        shutil.rmtree(old)
    except OSError as exc:  # the new export is in place; say what is left over rather than hiding it
        raise ExportError(f"exported to {out_dir}, but the earlier export moved to {old} could not be removed: "
                          f"{exc.strerror or exc}") from None


MAX_BATCH = 100_000  # candidates per call the program accepts (the service takes at most 1,000)


def _complete_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """fbgemm's asynchronous_complete_cumsum in plain aten: [n] lengths -> [n + 1] offsets starting at 0."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def _jagged_to_padded_dense(values: torch.Tensor, offsets: list[torch.Tensor], max_lengths: list[int],
                            padding_value: float = 0.0) -> torch.Tensor:
    """fbgemm's jagged_to_padded_dense (one jagged dimension) in plain aten: values [nnz, ...] with offsets [B + 1]
    -> [B, L, ...], each row's first L values, then `padding_value`. A padding row appended to the values is what
    every position past a row's end reads, so an empty batch of ids (nnz = 0) needs no special case."""
    (row_offsets,), (steps,) = offsets, max_lengths
    lengths = row_offsets[1:] - row_offsets[:-1]
    positions = torch.arange(steps, device=values.device)
    index = torch.where(positions[None, :] < lengths[:, None], row_offsets[:-1, None] + positions[None, :], values.shape[0])
    return torch.cat([values, values.new_full((1, *values.shape[1:]), padding_value)])[index]


def _fbgemm_decompositions() -> dict[Any, Any]:
    """The fbgemm operators TorchRec's KeyedJaggedTensor and JaggedTensor put into the graph, as aten: a program
    holding `torch.ops.fbgemm.*` does not even deserialize in a process that has not imported fbgemm_gpu."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm; torchrec imported it already)

    return {torch.ops.fbgemm.asynchronous_complete_cumsum.default: _complete_cumsum,
            torch.ops.fbgemm.jagged_to_padded_dense.default: _jagged_to_padded_dense}


def export_dlrm(ranker: TrainedRanker, example: DLRMInputs) -> torch.export.ExportedProgram:
    """The DLRM as a torch.export program of aten operators only (loads with `import torch` alone), for 1 to
    MAX_BATCH rows and any number of ids.

    Sizes 0 and 1 are special to torch.export: traced on a batch of B >= 2 it assumes B != 1 wherever a shape
    broadcasts, and guards the program against one row (`Dim("batch", min=2)`; one candidate is a valid /rank
    request). `backed_size_oblivious` makes the tracer treat the batch as "some size >= 1" instead of guarding, so
    min=1 holds; it must stay on while the fbgemm operators are decomposed, which traces the graph again.
    tests/test_export.py scores batches of 1, 2, 7 and 1,000 rows with the saved program in a bare process."""
    import torch.fx.experimental._config as shape_config

    scorer = DLRMScorer(ranker.model.eval(), [f.key for f in ranker.pipeline.sparse_features]).eval()
    args = flat_inputs(example)
    batch, nnz = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("nnz", min=1)
    # lengths hold one count per (key, row): K * batch of them
    with torch.no_grad(), shape_config.patch(backed_size_oblivious=True):
        program = torch.export.export(scorer, args, dynamic_shapes=({0: batch}, {0: nnz}, {0: len(scorer.keys) * batch}), strict=False)
        program = program.run_decompositions(_fbgemm_decompositions())
    foreign = sorted({str(node.target) for node in program.graph.nodes
                      if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace != "aten"})
    if foreign:  # a model change brought in another library's operator: fail here, not in the serving stack
        raise RuntimeError(f"the exported DLRM uses non-aten operators {foreign}: add their decompositions to ranker/export.py")
    return program
