"""Shared fixtures: simulated data is made once per test session."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from pipelines.data.sources.simulator import preset, simulate

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
