"""examples/*.py run as a user runs them (a subprocess, the run folder as argument) on the shared `tiny_run`.

Each must finish well inside its timeout and print what it claims; none may change the run folder (the other
tests share it): the embedding example writes into tmp_path, the other two only read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 300  # each takes well under a minute on an idle machine; the shared 2-core one is often 5x slower


def _example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          cwd=EXAMPLES.parent, env=env)
    assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run_untouched(tiny_run):
    """The tiny run folder, checked after the module to be as the examples found it."""
    run, _, _ = tiny_run
    before = _files(run)
    yield run
    assert _files(run) == before, "an example changed the shared run folder"


def test_every_example_has_a_docstring_saying_how_to_run_it():
    for path in sorted(EXAMPLES.glob("*.py")):
        text = path.read_text()
        assert text.startswith('"""') and f"python examples/{path.name} " in text, path.name
        assert len(text.splitlines()) <= 90, f"{path.name}: an example stays short"
        assert f"({path.name})" in (EXAMPLES / "README.md").read_text(), f"{path.name} is not linked from examples/README.md"


def test_embed_log(run_untouched, tmp_path):
    out = _example("embed_log.py", str(run_untouched), "--conditions", "surface=home,surface=search", "--out", str(tmp_path / "emb"))
    assert " vectors of 64 floats " in out and f"in {tmp_path / 'emb'}" in out and "condition surface=home" in out
    assert (tmp_path / "emb" / "manifest.json").exists()


def test_score_features(run_untouched):
    out = _example("score_features.py", str(run_untouched), "--model", "lightgbm", "--variant", "lum")
    lines = out.splitlines()
    assert lines[0].startswith("lightgbm/lum for user ") and "'surface':" in lines[0]
    scores = [float(line.split()[1]) for line in lines[1:]]
    assert scores and scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)


def test_rank_http_starts_lum_serve_and_posts_rank(run_untouched):
    out = _example("rank_http.py", str(run_untouched), "--model", "lightgbm", "--variant", "lum", "--allow-rolling")
    lines = out.splitlines()
    assert lines[0].startswith("POST http://127.0.0.1:") and lines[1] == "-> 200" and lines[2].startswith("global-lightgbm-lum (LM lum-tiny-")
    scores = [float(line.split()[1]) for line in lines[3:]]
    assert scores and all(0 < s < 1 for s in scores)
