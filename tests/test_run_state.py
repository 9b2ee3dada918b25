"""run_state.json: each step records the settings it ran with; other settings are an error naming them, unless forced."""

from __future__ import annotations

import json

import pytest

from pipelines.paths import RunPaths
from pipelines.run.config import load_run_config
from pipelines.run.execute import content_settings
from pipelines.run.state import RunState, SettingsChangedError, changed_settings
from pipelines.steps import UP_TO_DATE


def _state(tmp_path, force: bool = False) -> RunState:
    config = load_run_config(None, {"run_dir": str(tmp_path)})
    return RunState(RunPaths(tmp_path), config, force=force)


def _ranker(num_leaves: int, threads: int = 1):
    config = load_run_config(None, {"run_dir": "x", "rankers": {"lightgbm": {"num_leaves": num_leaves, "threads": threads}}})
    return content_settings(config.rankers.ranker_config("lightgbm", "lum"))


def test_a_step_run_with_other_settings_is_an_error_naming_each_setting_and_leaves_the_record(tmp_path):
    calls: list[bool] = []
    _state(tmp_path).step("ranker", lambda redo: calls.append(redo), print, settings={"ranker": _ranker(31)})
    before = json.loads((tmp_path / "run_state.json").read_text())["steps"]["ranker"]
    with pytest.raises(SettingsChangedError) as error:
        _state(tmp_path).step("ranker", lambda redo: calls.append(redo), print, settings={"ranker": _ranker(63)})
    message = str(error.value)
    assert "'ranker'" in message and "ranker.lightgbm.num_leaves: 31 before, 63 now" in message and "--force" in message
    assert calls == [False]  # the step did not run again
    assert json.loads((tmp_path / "run_state.json").read_text())["steps"]["ranker"] == before


def test_forced_a_changed_step_is_redone_and_records_its_new_settings(tmp_path):
    calls: list[bool] = []
    _state(tmp_path).step("ranker", lambda redo: calls.append(redo), print, settings={"ranker": _ranker(31)})
    lines: list[str] = []
    _state(tmp_path, force=True).step("ranker", lambda redo: calls.append(redo), lines.append, settings={"ranker": _ranker(63)})
    assert calls == [False, True]
    assert any("settings changed (ranker.lightgbm.num_leaves: 31 before, 63 now): redone" in line for line in lines)
    recorded = json.loads((tmp_path / "run_state.json").read_text())["steps"]["ranker"]
    assert recorded["values"]["ranker"]["lightgbm"]["num_leaves"] == 63
    # unchanged settings under --force: nothing to redo
    _state(tmp_path, force=True).step("ranker", lambda redo: calls.append(redo) or UP_TO_DATE, print, settings={"ranker": _ranker(63)})
    assert calls[-1] is False


def test_settings_that_only_change_speed_are_not_a_change(tmp_path):
    calls: list[bool] = []
    _state(tmp_path).step("ranker", lambda redo: calls.append(redo), print, settings={"ranker": _ranker(31, threads=1)})
    _state(tmp_path).step("ranker", lambda redo: calls.append(redo), print, settings={"ranker": _ranker(31, threads=2)})
    assert calls == [False, False]


def test_a_redone_step_makes_the_steps_reading_its_output_differ_in_turn(tmp_path):
    """The `after` chain: forcing the upstream step changes the downstream step's settings, which is redone too."""
    calls: list[tuple[str, bool]] = []

    def run(state: RunState, leaves: int) -> None:
        state.step("pretrain", lambda redo: calls.append(("pretrain", redo)), print, settings={"lm": {"leaves": leaves}})
        state.step("embed", lambda redo: calls.append(("embed", redo)), print, settings={"after": state.settings_of("pretrain")})

    run(_state(tmp_path), 1)
    with pytest.raises(SettingsChangedError, match="lm.leaves: 1 before, 2 now"):
        run(_state(tmp_path), 2)
    run(_state(tmp_path, force=True), 2)
    assert calls == [("pretrain", False), ("embed", False), ("pretrain", True), ("embed", True)]
    assert changed_settings({"after": "aaa"}, {"after": "bbb"}) == ["the step it reads from ran with other settings (aaa before, bbb now)"]


def test_a_failed_step_is_checked_against_the_settings_it_failed_with(tmp_path):
    def fail(redo: bool) -> None:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _state(tmp_path).step("ranker", fail, print, settings={"ranker": _ranker(31)})
    with pytest.raises(SettingsChangedError):  # its half-made output is of the old settings
        _state(tmp_path).step("ranker", fail, print, settings={"ranker": _ranker(63)})
    calls: list[bool] = []
    _state(tmp_path).step("ranker", lambda redo: calls.append(redo), print, settings={"ranker": _ranker(31)})
    assert calls == [False]  # the same settings resume


def test_steps_recorded_before_the_values_were_kept_are_not_checked(tmp_path):
    (tmp_path / "run_state.json").write_text(json.dumps({"steps": {"ranker": {"status": "done", "settings": "0123456789ab", "seconds": 3.0}}}))
    calls: list[bool] = []
    _state(tmp_path).step("ranker", lambda redo: calls.append(redo), print, settings={"ranker": _ranker(63)})
    assert calls == [False]


def test_changed_settings_names_added_and_removed_keys():
    assert changed_settings({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": [1, 3], "d": True}}) == [
        "a.c: [1, 2] before, [1, 3] now", "a.d: '(not set)' before, True now"]


def test_a_setting_newer_than_the_recorded_step_is_no_change_at_its_default():
    """A run made before a setting existed resumes: the setting at its default is what the step did without it; any
    other value is a change. An embeddings folder recorded absolute is the same as its run-relative record now."""
    from pipelines.run.state import changed_settings

    recorded = {"data": {"source": "files"}, "embeddings": "/old/place/run/embeddings/global-tiny"}
    defaults = {"data": {"source": "simulator", "items_map": []}}
    now = {"data": {"source": "files", "items_map": []}, "embeddings": "embeddings/global-tiny"}
    assert changed_settings(recorded, now, defaults) == []
    assert changed_settings(recorded, {**now, "data": {"source": "files", "items_map": ["id=item_id"]}}, defaults) == [
        "data.items_map: '(not set)' before, ['id=item_id'] now"]
    assert changed_settings(recorded, now) == ["data.items_map: '(not set)' before, [] now"]  # no defaults: as before
    assert changed_settings(recorded, {**now, "embeddings": "embeddings/other"}, defaults) != []
