"""Shared fixtures: simulated data is made once per test session."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml

from pipelines.data.sources.simulator import preset, simulate

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The `e2e` marker (pyproject.toml; `make test-fast` leaves these tests out): end-to-end and service tests. A test
# that uses one of these fixtures, directly or through another fixture, gets it here; a module that is end to end
# throughout says `pytestmark = pytest.mark.e2e`, and a single test `@pytest.mark.e2e`.
E2E_FIXTURES = frozenset({
    "tiny_run",       # a whole `lum run` (below)
    "tiny_lm",        # a behaviour LM pretrained on the tiny simulator (below)
    "redis_url",      # a real redis-server (below)
    "two_protocols",  # a whole `lum run` with two protocols (tests/test_snapshot_protocol.py)
})



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_sim() -> tuple[pa.Table, pa.Table]:
    """The `tiny` simulator preset: events and items."""
    return simulate(preset("tiny"))


@pytest.fixture(scope="session")
def mid_sim() -> tuple[pd.DataFrame, pd.DataFrame]:
    """2,000 users of the default preset's world (about 0.5 s): large enough for statistical properties."""
    events, items = simulate(preset("default", n_users=2000, chunk_users=2000))
    return events.to_pandas(), items.to_pandas()


@pytest.fixture(scope="session")
def ml_latest_small() -> Path:
    path = SHARED_DATA / "ml-latest-small"
    if not (path / "ratings.csv").exists():
        pytest.skip(f"{path} not found: MovieLens tests need ../shared/data beside the checkout (CI has it)")
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tiny_sim):
    """A `tiny` behaviour LM trained for a few seconds on the tiny simulator's per-user pretraining window."""
    from lum.pretrain import PretrainConfig, pretrain
    from lum.tokenizer import TokenizerConfig
    from pipelines.data.split import SplitConfig, split_events

    events, items = tiny_sim
    tables, _ = split_events(events, SplitConfig("per-user"))
    folder = tmp_path_factory.mktemp("tiny_lm") / "model"
    manifest = pretrain(
        tables["pretrain"].to_pandas(),
        folder,
        PretrainConfig(preset="tiny", epochs=3, rows_per_batch=4, row_tokens=512),
        TokenizerConfig(("surface", "device", "daypart")),
        items=items.to_pandas(),
        progress=False,
    )
    return folder, manifest


# the run config of the shared tiny run (tests/test_pipeline.py, tests/test_serve.py)
TINY_RUN = {
    "data": {"source": "simulator", "preset": "tiny"},
    "protocols": [{"split": "global", "features": "rolling"}],
    # semantic ids as the demo (configs/demo.yaml), with a codebook that fits the tiny preset's 300 items
    # one torch thread: the same-model test pretrains again in this process after the rankers set one thread
    "lm": {"pretrain": {"preset": "tiny", "epochs": 2, "rows_per_batch": 4, "threads": 1},
           "tokenizer": {"item_tokenization": "semantic", "vector_column": "content", "categorical_columns": ["category"],
                         "semantic_codebook_size": 16, "semantic_levels": 2}},
    "embed": {"job": {"engine": "torch"}, "conditions": ["surface=home", "surface=search", "surface=item_detail", "surface=cart"]},
    "rankers": {"models": ["dlrm", "lightgbm"], "variants": ["base", "lum"], "dlrm": {"epochs": 2, "threads": 1}, "lightgbm": {"threads": 1},
                "features": {"request_features": True}},
    "report": {"n_bootstrap": 20},
    "targets": {"gauc_lift_min": 0.01},
    # the retrieval A/B (LM retrieval of 1,000 requests) is off in every shared test run: it is tested once, on a copy
    # of this run (tests/test_pipeline.py::test_the_retrieval_ab_step_adds_the_reports_retrieval_section_to_a_copy_of_the_run)
    "retrieval": {"enabled": False},
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """`lum run` of TINY_RUN on the tiny simulator (torch engine, about 1-2 min): (run folder, config file, output).

    Shared by many modules: a test that changes the run works on its own copy (shutil.copytree to its tmp_path; a
    copied run folder resumes with `lum run`, tests/test_pipeline.py), never on this one."""
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(root / "run"), **TINY_RUN}))
    from click.testing import CliRunner

    from pipelines.cli import main

    result = CliRunner().invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root / "run", config, result.output


@pytest.fixture(scope="module")
def redis_url():
    """A real redis-server on a free localhost port for one test module (each module its own: their Feast repos share
    a project name, so their keys would collide in one server), stopped after it."""
    from feature_store.repo import FeatureStoreError
    from feature_store.serve import RedisServer

    try:
        server = RedisServer()
    except FeatureStoreError as exc:
        pytest.skip(f"{exc} (.ci/run installs Debian's redis-server)")
    with server:
        yield server.url


def redis_copy_of_run(run_root: Path, dest: Path, redis_url: str):
    """A copy of a run folder whose Feast repo uses the Redis server at `redis_url` as its online store (applied, not
    yet materialized): (its RunPaths, its FeatureRepo)."""
    import shutil

    from feature_store.repo import FeatureRepo, OnlineStoreConfig
    from pipelines.paths import RunPaths
    from pipelines.steps.features import prepare_repo

    paths = RunPaths(dest)
    shutil.copytree(run_root, paths.root)
    repo = FeatureRepo(paths.feature_repo)
    repo.materialized_file.unlink()
    repo.init(online=OnlineStoreConfig("redis", redis_url))
    prepare_repo(paths)
    return paths, repo
