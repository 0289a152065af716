"""The README's tables are the code's: the error table is `app.errors.STATUS_BY_ERROR`, the
settings table is `app.settings.Settings`. A change to either without the other fails here."""

from __future__ import annotations

import re

from app.errors import STATUS_BY_ERROR
from app.settings import Settings
from models.engine import ENGINE_DEFAULTS, EngineConfig
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
    fields = Settings.model_fields
    assert set(rows) == {f"FER_{name.upper()}" for name in fields}
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    for name, field in fields.items():
        documented = rows[f"FER_{name.upper()}"]
        if field.default_factory is not None:
            assert documented == "CPU count", name
            continue
        value = getattr(settings, name)
        if value is None:
            assert documented.startswith("("), name  # a shipped default, described in words
            continue
        if name == "checkpoint":
            assert documented == "`models/checkpoint.pth`" and value.parts[-2:] == ("models", "checkpoint.pth")
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert documented == f"`{shown}`", name


def test_the_engine_defaults_have_one_home_and_every_engine_knob_is_a_setting() -> None:
    assert set(EngineConfig.__dataclass_fields__) <= set(Settings.model_fields)
    from_settings = Settings(_env_file=None).engine_config()  # type: ignore[call-arg]
    for name in EngineConfig.__dataclass_fields__:
        if name not in ("threads", "prepare_workers"):  # CPU count, the same factory in both
            assert getattr(from_settings, name) == getattr(ENGINE_DEFAULTS, name), name
    changed = {
        "max_batch": 7,
        "queue_size": 9,
        "max_faces": 3,
        "min_face_px": 40,
        "detect_max_side": 500,
        "tta": "flip",
    }
    config = Settings(_env_file=None, **changed).engine_config()  # type: ignore[call-arg]
    assert {name: getattr(config, name) for name in changed} == changed


def test_every_readme_status_row_says_when() -> None:
    for row in table_rows("### Errors"):
        assert re.fullmatch(r"\d{3}", row[0]) and len(row[1]) > 10
