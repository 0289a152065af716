"""The README's tables are the code's: the error table is `app.errors.STATUS_BY_ERROR`, the
settings table is `app.settings.Settings`. A change to either without the other fails here."""

from __future__ import annotations

import dataclasses
import re

import pytest

from app.errors import STATUS_BY_ERROR
from app.settings import Settings, setting_fields, setting_value
from models.config import ENGINE_DEFAULTS, engine_config, engine_fields
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def table_rows(heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`, as lists of stripped cells."""
    section = README.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if not set(cells[0]) <= set("-: "):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # the header


def test_the_readme_error_table_lists_every_status_the_service_answers_with() -> None:
    statuses = {int(row[0]) for row in table_rows("### Errors")}
    assert statuses == set(STATUS_BY_ERROR.values())


def test_the_readme_settings_table_names_every_setting_with_its_default() -> None:
    rows = {row[0].strip("`"): row[1] for row in table_rows("### Settings")}
    fields = setting_fields()
    assert set(rows) == {f"FER_{name.upper()}" for name in fields}
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    for name, field in fields.items():
        documented = rows[f"FER_{name.upper()}"]
        if field.default_factory not in (None, dataclasses.MISSING):
            assert documented == "CPU count", name
            continue
        value = setting_value(settings, name)
        if value is None:
            assert documented.startswith("("), name  # a shipped default, described in words
            continue
        if name == "checkpoint":
            assert documented == "`models/checkpoint.pth`" and value.parts[-2:] == ("models", "checkpoint.pth")
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert documented == f"`{shown}`", name


def test_the_engine_configuration_is_contained_in_the_settings_and_read_by_its_flat_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings(_env_file=None).engine == ENGINE_DEFAULTS  # type: ignore[call-arg]
    changed = {
        "max_batch": 7,
        "queue_size": 9,
        "max_faces": 3,
        "min_face_px": 40,
        "detect_max_side": 500,
        "tta": "flip",
    }
    config = Settings(_env_file=None, **changed).engine  # type: ignore[call-arg]
    assert {name: getattr(config, name) for name in changed} == changed
    monkeypatch.setenv("FER_MAX_FACES", "4")
    monkeypatch.setenv("FER_DETECTOR", "haar")
    monkeypatch.setenv("FER_PORT", "9001")
    from_env = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (from_env.engine.max_faces, from_env.engine.detector, from_env.port) == (4, "haar", 9001)
    assert Settings(_env_file=None, max_faces=6).engine.max_faces == 6  # type: ignore[call-arg]  # given beats the environment
    assert engine_config({"FER_MAX_FACES": "4", "FER_DETECTOR": "haar"}) == dataclasses.replace(
        ENGINE_DEFAULTS, max_faces=4, detector="haar"
    )


def test_no_engine_knob_is_declared_twice() -> None:
    """One home for each knob: the service's settings and the Ray job contain the engine's configuration."""
    from cli.scale import RayJob

    assert not set(engine_fields()) & set(Settings.model_fields)
    assert not set(engine_fields()) & {item.name for item in dataclasses.fields(RayJob)}
    for path in [ROOT / "app" / "settings.py", *(ROOT / "cli").glob("*.py")]:
        assert "EngineConfig(" not in path.read_text(), f"{path} builds the configuration field by field"


def test_every_readme_status_row_says_when() -> None:
    for row in table_rows("### Errors"):
        assert re.fullmatch(r"\d{3}", row[0]) and len(row[1]) > 10
