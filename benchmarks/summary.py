"""Builds benchmarks/results/SUMMARY.md from the benchmarks' JSON results (and the block of docs/benchmarks.md).

    python -m benchmarks.run_all --summary-only    # the usual way in
    python -m benchmarks.summary                   # the same, without the runner

Every `<name>.json` written by `common.write_results` gets one section: a compact table of its headline figures
(the columns picked in `TABLES`; a benchmark not listed there shows all of its rows and columns) and a line with
the command, the machine and the date from the JSON. `run_all` records each run's mode, exit code and wall time
in `_runs.json` beside them (files whose name starts with `_` are not benchmark results); the summary shows the
wall time of the run that wrote a JSON, and flags a run that failed after it. The summary body also replaces the
text between the `<!-- bench-summary:begin -->` and `<!-- bench-summary:end -->` markers of the benchmarks page,
docs/benchmarks.md (the README links to it), when both are there; without them the page is left alone.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import REPO_ROOT, RESULTS_DIR

# the docs page whose marked block shows the full-size results (README.md links to it)
PAGE = REPO_ROOT / "docs" / "benchmarks.md"
SUMMARY_NAME = "SUMMARY.md"
RUNS_NAME = "_runs.json"
BEGIN = "<!-- bench-summary:begin -->"
END = "<!-- bench-summary:end -->"

# pipeline order; benchmarks not listed here follow in alphabetical order
ORDER = ("data", "pretrain", "embed", "shard_reads", "rolling", "features", "offline_join",
         "ranker", "serve", "scaling", "retrieve", "retrieval_quality", "retrieval_ab",
         "quality-demo", "quality-movielens")

Row = dict[str, Any]


@dataclass(frozen=True)
class Table:
    """One table of a benchmark's section.

    columns: (key, header) pairs; a key ending in `*` stands for every key with that prefix (header: the key).
    Columns no selected row has are dropped. when: which rows go in (default: all).
    """

    columns: tuple[tuple[str, str], ...]
    when: Callable[[Row], bool] = lambda row: True
    title: str = ""


TABLES: dict[str, list[Table]] = {
    "data": [Table((("preset", "preset"), ("users", "users"), ("events", "events"), ("seconds", "s"),
                    ("events_per_s", "events/s"), ("peak_rss_mib", "peak RSS MiB"), ("parquet_mib", "Parquet MiB")))],
    "pretrain": [Table((("preset", "preset"), ("packing", "packing"), ("steps", "steps"), ("real_tokens_per_s", "real tokens/s"),
                        ("mfu_vs_measured_matmul", "MFU"), ("non_padding_share", "non-padding"),
                        ("packing_speedup", "packing speed-up")))],
    "embed": [
        Table((("engine", "engine"), ("K", "K"), ("users", "users"), ("tokens_per_s", "tokens/s"), ("time_vs_K1", "time vs K=1"),
               ("speed_vs_naive*", "")), when=lambda row: "tokens_per_s" in row, title="Throughput"),
        Table((("engine", "job"), ("K", "K"), ("users", "users"), ("seconds", "s"), ("peak_rss_mib", "peak RSS MiB")),
              when=lambda row: "peak_rss_mib" in row, title="Peak memory"),
    ],
    "rolling": [Table((("engine", "engine"), ("preset", "preset"), ("users", "users"), ("rows", "rows"), ("K", "K"),
                       ("queries", "queries"), ("seconds", "s"), ("queries_per_s", "queries/s"), ("time_vs_fastest", "time vs fastest")))],
    "features": [
        Table((("measure", "route"), ("p50_ms", "p50 ms"), ("value", "p99 ms"), ("target_p99_ms", "target p99 ms"),
               ("floor_p99_ms", "floor p99 ms"), ("p99_vs_floor", "p99 / floor")),
              when=lambda row: "p99_vs_floor" in row, title="Online lookups"),
        Table((("measure", "measure"), ("value", "value"), ("unit", "unit")),
              when=lambda row: "p99_vs_floor" not in row, title="Offline"),
    ],
    "offline_join": [Table((("engine", "engine"), ("workers", "workers"), ("rows", "rows"), ("rows_per_s", "rows/s"), ("seconds", "s"),
                            ("peak_mib", "peak MiB"), ("vs_floor", "time vs floor"), ("same_rows_as_floor", "same rows"),
                            ("growth_exponent", "growth b (s ~ rows^b)")))],
    "online_memory": [Table((("dim", "dimensions"), ("rows", "vectors"), ("bytes_per_vector", "bytes / vector"),
                             ("bytes_per_value", "bytes / value"), ("overhead_bytes", "overhead bytes")))],
    "shard_reads": [Table((("users", "users"), ("events", "events"), ("shards", "shards"), ("per_shard_pass_s", "a pass per shard s"),
                           ("partition_once_s", "partition once s"), ("speedup", "speed-up"), ("per_shard_pass_s_growth", "growth before"),
                           ("partition_once_s_growth", "growth after")))],
    "ranker": [
        Table((("what", "what"), ("examples_per_s", "examples/s"), ("examples_per_s_worst", "worst"),
               ("examples_per_s_best", "best"), ("target", "target"), ("valid_auc", "valid AUC"), ("load_avg_1m", "load 1m")),
              when=lambda row: "examples_per_s" in row, title="DLRM training"),
        Table((("what", "what"), ("threads", "threads"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("target", "target"),
               ("load_avg_1m", "load 1m")), when=lambda row: "p99_ms" in row, title="Scoring latency"),
        Table((("what", "what"), ("seconds", "s"), ("best_iteration", "best iteration"), ("valid_auc", "valid AUC"),
               ("features", "features")), when=lambda row: row.get("what") == "LightGBM train", title="LightGBM"),
    ],
    "serve": [Table((("model", "model"), ("store", "store"), ("route", "route"), ("clients", "clients"), ("p50_ms", "p50 ms"),
                     ("p99_ms", "p99 ms"), ("goal_p99_ms", "goal p99 ms"), ("requests_per_s", "requests/s"), ("errors", "errors"),
                     ("met", "met")))],
    "scaling": [
        Table((("curve", "curve"), ("engine", "engine"), ("preset", "preset"), ("params", "parameters"), ("history", "history"),
               ("K", "K"), ("users", "users"), ("seconds", "s"), ("users_per_s", "users/s"), ("history_tokens_per_s", "history tokens/s"),
               ("peak_rss_mib", "peak RSS MiB")), when=lambda row: "seconds" in row, title="Embedding cost curves"),
        Table((("curve", "curve"), ("engine", "engine"), ("variable", "against"), ("fit", "fit"), ("growth", "growth")),
              when=lambda row: "growth" in row, title="Growth"),
    ],
    "retrieve": [Table((("engine", "engine"), ("catalogue", "items"), ("history", "history"), ("prompt_tokens", "prompt tokens"),
                        ("users", "users"), ("users_per_s", "users/s"), ("ms_per_user_batched", "ms/user (batch)"),
                        ("ms_single_user_median", "ms one user"), ("candidates_per_user", "candidates")))],
    "retrieval_quality": [Table((("dataset", "data"), ("held_out", "held out"), ("method", "method"), ("users", "users"),
                                 ("hr@10", "HR@10"), ("ndcg@10", "NDCG@10"), ("recall@50", "Recall@50"), ("not_generable", "not generable"),
                                 ("cold_targets", "cold targets"), ("cold_share_of_top10", "cold share of top 10"),
                                 ("cold_recall@50", "cold Recall@50")))],
    "retrieval_ab": [Table((("candidates", "candidates"), ("requests", "requests"), ("mean_size", "mean size"), ("recall", "recall"),
                            ("recall_lift", "recall lift"), ("recall_lift_low", "low"), ("recall_lift_high", "high"),
                            ("oracle_ctr@10", "oracle CTR@10"), ("oracle_ctr@10_lift", "lift"), ("oracle_ctr@10_lift_low", "low"),
                            ("oracle_ctr@10_lift_high", "high")))],
}
# the quality curves, one JSON per run folder they were measured on (bench_quality --run runs/<name>)
QUALITY_TABLE = Table((("curve", "curve"), ("preset", "preset"), ("params", "parameters"), ("epochs", "epochs"),
                       ("history", "history"), ("users", "users"), ("base_gauc", "base GAUC"), ("lum_gauc", "+LUM GAUC"),
                       ("gauc_lift", "lift"), ("low", "low"), ("high", "high"), ("pretrain_s", "pretrain s")))
TABLES.update({"quality-demo": [QUALITY_TABLE], "quality-movielens": [QUALITY_TABLE]})


@dataclass
class RunRecord:
    """What run_all knows about the last run of one benchmark (kept in `_runs.json`)."""

    mode: str
    args: list[str]
    exit_code: int
    wall_s: float
    started: str
    json_date: str | None = None  # the date in the JSON after the run; None when the run wrote none

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class Result:
    """One benchmark's JSON (None when there is none) and its run record."""

    name: str
    payload: dict[str, Any] | None = None
    run: RunRecord | None = None


def load_runs(results_dir: Path) -> dict[str, RunRecord]:
    path = Path(results_dir) / RUNS_NAME
    if not path.exists():
        return {}
    return {name: RunRecord(**record) for name, record in json.loads(path.read_text()).items()}


def save_run(results_dir: Path, name: str, record: RunRecord) -> None:
    """Adds or replaces one benchmark's run record in `_runs.json`."""
    runs = load_runs(results_dir)
    runs[name] = record
    path = Path(results_dir) / RUNS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: vars(v) for k, v in sorted(runs.items())}, indent=2) + "\n")


def load_results(results_dir: Path) -> list[Result]:
    """Every `<name>.json` in results_dir (not `_*.json`) plus run records without a JSON, in ORDER."""
    results_dir = Path(results_dir)
    found: dict[str, Result] = {}
    for path in sorted(results_dir.glob("*.json")):
        if path.name.startswith("_"):
            continue
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or not isinstance(payload.get("rows", []), list):
            print(f"skipped {path}: not a benchmark result (common.write_results' layout)")
            continue
        found[path.stem] = Result(path.stem, payload)
    for name, record in load_runs(results_dir).items():
        found.setdefault(name, Result(name)).run = record
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(found.values(), key=lambda r: (rank.get(r.name, len(ORDER)), r.name))


def fmt(value: Any) -> str:
    """One table cell: thousands separators for numbers, yes/no for booleans, `|` escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:,}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table; numeric-looking columns are right-aligned."""
    def number(cell: str) -> bool:
        try:
            float(cell.replace(",", ""))
            return True
        except ValueError:
            return False

    def numeric(i: int) -> bool:
        cells = [r[i] for r in rows if r[i]]
        return bool(cells) and all(number(c) for c in cells)

    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_table(table: Table, rows: list[Row]) -> tuple[str, list[Row]]:
    """The markdown for one Table and the rows it shows: those `when` selects that have one of its columns
    ("" and [] when there are none)."""
    columns: list[tuple[str, str]] = []
    for key, header in table.columns:
        if key.endswith("*"):
            matches = dict.fromkeys(k for row in rows for k in row if k.startswith(key[:-1]))
            columns += [(k, k) for k in matches]
        elif any(key in row for row in rows):
            columns.append((key, header))
    shown = [row for row in rows if any(k in row for k, _ in columns)]
    if not shown:
        return "", []
    body = markdown_table([h for _, h in columns], [[fmt(row.get(k)) for k, _ in columns] for row in shown])
    return (f"{table.title}:\n\n" if table.title else "") + body, shown


def generic_tables(rows: list[Row]) -> list[Table]:
    """All rows, all columns (in first-seen order): the fallback for a benchmark not in TABLES."""
    keys = dict.fromkeys(k for row in rows for k in row)
    return [Table(tuple((k, k) for k in keys))]


def parse_date(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def written_at(result: Result) -> str | None:
    return (result.payload or {}).get("machine", {}).get("date")


def wrote_json(result: Result) -> bool:
    """Whether run_all's last run of this benchmark succeeded and wrote the JSON shown."""
    return result.run is not None and result.run.ok and result.payload is not None and result.run.json_date == written_at(result)


def failed_since(result: Result) -> bool:
    """Whether run_all's last run of this benchmark failed after (or without) the JSON shown."""
    run = result.run
    if run is None or run.ok:
        return False
    written, started = parse_date(written_at(result)), parse_date(run.started)
    return written is None or started is None or written < started


def provenance(result: Result) -> str:
    """The command / machine / date line, plus the wall time or the failure recorded by run_all."""
    parts = []
    run = result.run
    if result.payload is not None:
        machine = result.payload.get("machine", {})
        facts = [f"{machine.get('cores', '?')} cores", f"{machine.get('ram_gib', '?')} GiB RAM"]
        facts += [str(machine["cpu"])] if machine.get("cpu") else []
        facts += [f"Python {machine['python']}"] if machine.get("python") else []
        parts.append(f"`{result.payload.get('command', '?')}` on {', '.join(facts)}, {machine.get('date', 'unknown date')}")
        if wrote_json(result):
            parts.append(f"wall time {run.wall_s:,.0f} s ({run.mode} run)")
    if failed_since(result):
        earlier = " (the figures above are from an earlier run)" if result.payload is not None else ""
        parts.append(f"**last run failed**: exit code {run.exit_code} after {run.wall_s:,.0f} s "
                     f"({run.mode} run started {run.started}){earlier}")
    return "; ".join(parts) + "."


def render_section(result: Result, level: int) -> str:
    lines = [f"{'#' * level} {result.name}", ""]
    if result.payload is not None:
        rows = [r for r in result.payload.get("rows", []) if isinstance(r, dict)]
        tables = TABLES.get(result.name) or generic_tables(rows)
        covered: set[int] = set()
        rendered = []
        for table in tables:
            text, shown = render_table(table, [r for r in rows if table.when(r)])
            if text:
                rendered.append(text)
                covered |= {id(r) for r in shown}
        rest = [r for r in rows if id(r) not in covered]
        if rest:  # rows no table showed (a benchmark whose rows changed shape): shown whole
            rendered.append(render_table(Table(generic_tables(rest)[0].columns, title="Other rows"), rest)[0])
        if not rendered:
            rendered.append("No rows.")
        for text in rendered:
            lines += [text, ""]
    else:
        lines += ["No results file.", ""]
    lines.append(provenance(result))
    notes = (result.payload or {}).get("notes")
    if notes:
        lines += ["", f"<details><summary>notes</summary>\n\n{notes}\n\n</details>"]
    return "\n".join(lines)


def overview(results: list[Result]) -> str:
    """One line per benchmark: date, machine, mode and wall time of the last run_all run, status."""
    rows = []
    for r in results:
        machine = (r.payload or {}).get("machine", {})
        fresh = wrote_json(r)
        if failed_since(r):
            status = f"failed (exit {r.run.exit_code})"
        else:
            status = "ok" if r.payload is not None else "no results"
        rows.append([
            r.name,
            fmt(machine.get("date", "")),
            f"{machine.get('cores', '?')} cores, {machine.get('ram_gib', '?')} GiB" if machine else "",
            r.run.mode if fresh else "",
            f"{r.run.wall_s:,.0f}" if fresh else "",
            status,
        ])
    return markdown_table(["benchmark", "date", "machine", "mode", "wall time s", "status"], rows)


def render_body(results: list[Result], level: int = 2) -> str:
    """The summary without its title: an overview table and one section per benchmark, headings at `level`."""
    if not results:
        return "No benchmark results yet: run `make bench`."
    parts = [overview(results)] + [render_section(r, level) for r in results]
    return "\n\n".join(parts)


def replace_block(text: str, body: str) -> str | None:
    """text with the part between the markers replaced by body; None when the markers are not both there in order."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        return None
    return text[: start + len(BEGIN)] + "\n" + body + "\n" + text[end:]


def build_summary(results_dir: Path = RESULTS_DIR, page: Path | None = PAGE) -> Path:
    """Writes results_dir/SUMMARY.md and, where both markers exist, the block of `page` (docs/benchmarks.md);
    returns SUMMARY.md's path."""
    results_dir = Path(results_dir)
    results = load_results(results_dir)
    intro = ("Built by `python -m benchmarks.run_all` (`make bench`) from `benchmarks/results/*.json`; "
             "each benchmark's command, machine and date come from its JSON.")
    summary = results_dir / SUMMARY_NAME
    results_dir.mkdir(parents=True, exist_ok=True)
    summary.write_text(f"# Benchmark summary\n\n{intro}\n\n{render_body(results, level=2)}\n")
    if page is not None and Path(page).exists():
        text = Path(page).read_text()
        updated = replace_block(text, render_body(results, level=3))  # the block sits under a `##` heading
        if updated is not None and updated != text:
            Path(page).write_text(updated)
    return summary


if __name__ == "__main__":
    print(f"wrote {build_summary()}")
