"""The benchmark summary: tables, provenance, run records and the block of docs/benchmarks.md, on small JSON files in a tmp dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.run_all import BENCHES, parse_only
from benchmarks.summary import BEGIN, END, PAGE, RunRecord, build_summary, replace_block, save_run

MACHINE = {"cores": 2, "ram_gib": 23.5, "cpu": "x86_64", "python": "3.11.7", "date": "2026-11-25T05:56:51+00:00"}


def write(folder: Path, name: str, rows: list[dict], command: str, date: str = MACHINE["date"], notes: str = "") -> None:
    payload = {"benchmark": name, "command": command, "machine": {**MACHINE, "date": date}, "notes": notes, "rows": rows}
    (folder / f"{name}.json").write_text(json.dumps(payload))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    write(folder, "embed", [
        {"engine": "vllm", "K": 1, "users": 200, "prompt_tokens": 24000, "tokens_per_s": 14198, "time_vs_K1": 1.0,
         "speed_vs_naive_float32": 1.3, "speed_vs_naive_bfloat16": 2.1},
        {"engine": "vllm", "K": 8, "users": 200, "prompt_tokens": 192000, "tokens_per_s": 101221, "time_vs_K1": 1.12,
         "speed_vs_naive_float32": 8.92, "speed_vs_naive_bfloat16": 12.5},
        {"engine": "torch job (lum embed), tiny", "K": 4, "users": 10000, "seconds": 11.4, "peak_rss_mib": 1825},
    ], "python /x/benchmarks/bench_embed.py --users 200 --repeats 1", notes="median of 1 run per cell")
    write(folder, "features", [
        {"measure": "training-set join, 200,000 impressions", "value": 6146, "unit": "rows/s", "seconds": 32.5},
        {"measure": "online python/sqlite: 1 user x 4 conditions + 100 items", "value": 7.8, "unit": "p99 ms", "p50_ms": 6.0,
         "floor_p50_ms": 4.05, "floor_p99_ms": 4.68, "p99_vs_floor": 1.67, "target_p99_ms": 20},
    ], "python /x/benchmarks/bench_features.py --quick", date="2026-11-24T04:33:16+00:00")
    write(folder, "mystery", [{"alpha": 1, "beta": "x|y"}, {"alpha": 2, "gamma": True}], "python /x/benchmarks/bench_mystery.py")
    (folder / "_runs.json").write_text("{}")
    return folder


def section(text: str, name: str) -> str:
    return text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]


def test_tables_and_provenance(results: Path) -> None:
    text = build_summary(results, page=None).read_text()
    assert text.startswith("# Benchmark summary")
    # overview, in pipeline order, unknown benchmarks last
    assert "| embed | 2026-11-25T05:56:51+00:00 | 2 cores, 23.5 GiB |  |  | ok |" in text
    assert text.index("## embed") < text.index("## features") < text.index("## mystery")

    embed = section(text, "embed")
    assert "| engine | K | users | tokens/s | time vs K=1 | speed_vs_naive_float32 | speed_vs_naive_bfloat16 |" in embed
    assert "| vllm | 8 | 200 | 101,221 | 1.12 | 8.92 | 12.5 |" in embed
    assert "prompt_tokens" not in embed  # not a headline column
    assert "| torch job (lum embed), tiny | 4 | 10,000 | 11.4 | 1,825 |" in embed
    assert ("`python /x/benchmarks/bench_embed.py --users 200 --repeats 1` on 2 cores, 23.5 GiB RAM, x86_64, "
            "Python 3.11.7, 2026-11-25T05:56:51+00:00.") in embed
    assert "median of 1 run per cell" in embed

    features = section(text, "features")
    assert "| route | p50 ms | p99 ms | target p99 ms | floor p99 ms | p99 / floor |" in features
    assert "| online python/sqlite: 1 user x 4 conditions + 100 items | 6.0 | 7.8 | 20 | 4.68 | 1.67 |" in features
    assert "| training-set join, 200,000 impressions | 6,146 | rows/s |" in features
    assert "`python /x/benchmarks/bench_features.py --quick`" in features and "2026-11-24T04:33:16+00:00" in features


def test_unknown_benchmark_shows_all_rows_and_columns(results: Path) -> None:
    mystery = section(build_summary(results, page=None).read_text(), "mystery")
    assert "| alpha | beta | gamma |" in mystery
    assert "| 1 | x\\|y |  |" in mystery
    assert "| 2 |  | yes |" in mystery
    assert "`python /x/benchmarks/bench_mystery.py` on 2 cores, 23.5 GiB RAM" in mystery


def test_known_benchmark_with_unexpected_rows_falls_back(results: Path) -> None:
    write(results, "data", [{"preset": "tiny", "users": 300, "events_per_s": 287122}, {"something": "new", "n": 12345}],
          "python /x/benchmarks/bench_data.py")
    write(results, "ranker", [{"renamed": 1}], "python /x/benchmarks/bench_ranker.py")
    (results / "stray.json").write_text("[1, 2]")
    text = build_summary(results, page=None).read_text()
    data = section(text, "data")
    assert "| preset | users | events/s |" in data and "| tiny | 300 | 287,122 |" in data
    assert "Other rows:\n\n| something | n |" in data and "| new | 12,345 |" in data
    assert "| renamed |" in section(text, "ranker") and "| 1 |" in section(text, "ranker")
    assert "stray" not in text


def test_run_records_wall_time_and_failure(results: Path) -> None:
    save_run(results, "embed", RunRecord(mode="quick", args=["--users", "200"], exit_code=0, wall_s=187.4,
                                         started="2026-11-25T05:53:00+00:00", json_date=MACHINE["date"]))
    save_run(results, "features", RunRecord(mode="full", args=[], exit_code=3, wall_s=42.0, started="2026-11-25T06:00:00+00:00"))
    save_run(results, "ranker", RunRecord(mode="quick", args=[], exit_code=-9, wall_s=5.0, started="2026-11-25T06:10:00+00:00"))
    text = build_summary(results, page=None).read_text()
    assert "| embed | 2026-11-25T05:56:51+00:00 | 2 cores, 23.5 GiB | quick | 187 | ok |" in text
    assert "wall time 187 s (quick run)" in section(text, "embed")
    assert "| features | 2026-11-24T04:33:16+00:00 | 2 cores, 23.5 GiB |  |  | failed (exit 3) |" in text
    assert ("**last run failed**: exit code 3 after 42 s (full run started 2026-11-25T06:00:00+00:00) "
            "(the figures above are from an earlier run)") in text
    assert "| ranker |  |  |  |  | failed (exit -9) |" in text
    assert "No results file." in section(text, "ranker")
    assert "_runs" not in text  # the run records are not a benchmark


def test_failure_older_than_the_json_is_not_flagged(results: Path) -> None:
    save_run(results, "features", RunRecord(mode="quick", args=[], exit_code=1, wall_s=3.0, started="2026-11-20T00:00:00+00:00"))
    text = build_summary(results, page=None).read_text()
    assert "failed" not in text


def test_page_block_is_replaced(results: Path, tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Benchmarks\n\n## Latest full results\n\n{BEGIN}\nold table\n{END}\n\nAfter.\n")
    build_summary(results, page)
    text = page.read_text()
    assert "old table" not in text
    assert text.startswith(f"# Benchmarks\n\n## Latest full results\n\n{BEGIN}\n")
    assert text.endswith(f"\n{END}\n\nAfter.\n")
    block = text.split(BEGIN)[1].split(END)[0]
    assert "### embed" in block and "## embed" not in block.replace("### embed", "")  # one level below the page's heading
    assert "| vllm | 8 | 200 | 101,221 | 1.12 | 8.92 | 12.5 |" in block
    assert "# Benchmark summary" not in block
    # rebuilding is stable
    build_summary(results, page)
    assert page.read_text() == text


@pytest.mark.parametrize("content", ["# Project\n\nNo markers.\n", f"# Project\n{BEGIN}\nonly the begin marker\n",
                                     f"# Project\n{END}\nwrong order\n{BEGIN}\n"])
def test_page_without_both_markers_is_untouched(results: Path, tmp_path: Path, content: str) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(content)
    before = page.stat().st_mtime_ns
    build_summary(results, page)
    assert page.read_text() == content
    assert page.stat().st_mtime_ns == before


def test_the_block_lives_in_docs_benchmarks_md_which_the_readme_links() -> None:
    """The destination of a full run: docs/benchmarks.md holds the markers in order; README.md only links to it."""
    from benchmarks.common import REPO_ROOT

    assert PAGE == REPO_ROOT / "docs" / "benchmarks.md"
    page = PAGE.read_text()
    assert replace_block(page, "body") is not None  # both markers, begin before end
    readme = (REPO_ROOT / "README.md").read_text()
    assert BEGIN not in readme and END not in readme
    assert "docs/benchmarks.md" in readme


def test_only_selects_in_pipeline_order() -> None:
    assert [b.name for b in parse_only("ranker, bench_data")] == ["data", "ranker"]
    assert parse_only(None) == list(BENCHES)
    with pytest.raises(ValueError, match="unknown benchmark"):
        parse_only("embed,nope")


def test_run_all_records_a_failure_and_goes_on(results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two benchmarks whose modules do not exist: both are tried, both recorded, the summary built, exit code 1."""
    import benchmarks.run_all as run_all

    page = tmp_path / "benchmarks.md"
    page.write_text(f"before\n{BEGIN}\nold\n{END}\n")
    fakes = (run_all.Bench("missing_one", quick=("--x",), full=("--y",)), run_all.Bench("missing_two", quick=(), full=()))
    monkeypatch.setattr(run_all, "BENCHES", fakes)
    monkeypatch.setattr(run_all, "BY_NAME", {b.name: b for b in fakes})
    monkeypatch.setattr(run_all, "RESULTS_DIR", results)
    monkeypatch.setattr(run_all, "PAGE", page)
    assert run_all.main(["--full"]) == 1
    runs = json.loads((results / "_runs.json").read_text())
    assert set(runs) == {"missing_one", "missing_two"}
    assert runs["missing_one"]["exit_code"] != 0 and runs["missing_one"]["args"] == ["--y"] and runs["missing_one"]["mode"] == "full"
    text = (results / "SUMMARY.md").read_text()
    assert "## missing_one" in text and "## missing_two" in text and "## embed" in text
    full_page = page.read_text()  # a full run rewrites the page's block
    assert "\nold\n" not in full_page and "### missing_one" in full_page and full_page.startswith(f"before\n{BEGIN}\n")
    # quick mode keeps its records and summary apart, never touching the full figures
    assert run_all.main([]) == 1
    quick = json.loads((results / "quick" / "_runs.json").read_text())
    assert quick["missing_one"]["mode"] == "quick" and quick["missing_one"]["args"] == ["--x"]
    assert (results / "quick" / "SUMMARY.md").exists() and (results / "SUMMARY.md").read_text() == text
    assert page.read_text() == full_page


def test_run_all_skips_a_benchmark_whose_input_is_missing(results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """A benchmark that needs a finished run is skipped with the reason, not run and not recorded as a failure."""
    import benchmarks.run_all as run_all

    fakes = (run_all.Bench("missing_one", quick=(), full=(), needs="no/such/run_state.json", needs_hint="run `make demo` first",
                           result="missing_one-demo"),)
    monkeypatch.setattr(run_all, "BENCHES", fakes)
    monkeypatch.setattr(run_all, "BY_NAME", {b.name: b for b in fakes})
    monkeypatch.setattr(run_all, "RESULTS_DIR", results)
    monkeypatch.setattr(run_all, "PAGE", tmp_path / "benchmarks.md")
    assert run_all.main(["--full"]) == 0
    assert "missing_one: skipped, it needs no/such/run_state.json: run `make demo` first" in capsys.readouterr().out
    assert "missing_one" not in json.loads((results / "_runs.json").read_text())
    # the quality benchmark is listed with the run it needs and the JSON it writes
    quality = next(b for b in BENCHES if b.name == "quality")
    assert quality.needs.startswith("runs/demo/") and quality.result_name == "quality-demo"


@pytest.mark.slow  # a child Python process
def test_peak_rss_of_a_child_is_its_own_not_its_parents() -> None:
    """ru_maxrss of a fresh child inherits the parent's peak on Linux; peak_rss_mib must not."""
    import subprocess
    import sys

    from benchmarks.common import REPO_ROOT, peak_rss_mib

    ballast = bytearray(600 * 2**20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touch every page so it is resident
    assert peak_rss_mib() > 600
    code = "from benchmarks.common import peak_rss_mib; print(peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout)
    assert 5 < child < 300
    del ballast
