"""The service's one settings object, read from `FER_*` environment variables.

The engine's knobs are `models.config.EngineConfig`, contained here as `engine` (one home for
each knob, its default and its bounds); the rest are the HTTP layer's own. The README's settings table is this class
(tests/test_docs.py checks the two agree).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from models.config import ENV_PREFIX, EngineConfig, engine_fields, engine_values_from_environ


class Settings(BaseSettings):
    """Every knob of the service; an invalid value stops start-up with a one-line reason.

    `engine` is the engine's configuration (`models.config.EngineConfig`), read from the same
    flat `FER_*` names as the rest (`FER_MAX_FACES`, not a nested name); the other fields are
    the HTTP layer's own. `Settings(max_faces=3)` sets an engine knob the same way.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_files: int = Field(64, ge=1, le=10_000)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_video_bytes: int = Field(50 * 1024 * 1024, ge=1024)  # POST /predict/video's own upload limit
    # Videos being uploaded at once, each spooled to /tmp (up to FER_MAX_VIDEO_BYTES, then the
    # analysis reads it): a slow upload holds one of these, not an analysis slot.
    max_video_uploads: int = Field(4, ge=1, le=256)
    body_timeout_s: float = Field(15.0, gt=0, description="a stalled upload is cut off after this many seconds")
    body_deadline_s: float = Field(120.0, gt=0, description="a whole body must arrive within this many seconds")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    max_pipelined: int = Field(32, ge=1, le=10_000)
    max_connections: int = Field(512, ge=1, le=100_000)
    keep_alive_s: float = Field(5.0, gt=0, le=600)
    # Who may call (app/clients.py): a file of `name:sha256-of-key` lines (None: open to anyone
    # who can reach the port); requests/s per client (0: no limit) and the burst it may save up;
    # browser origins allowed to call cross-origin, comma-separated and exact (none by default).
    api_keys_file: Path | None = None
    rate_limit: float = Field(0.0, ge=0, le=100_000)
    rate_burst: int = Field(20, ge=1, le=100_000)
    cors_origins: str = ""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # On SIGTERM: first FER_DRAIN_S of serving everything while /ready answers 503 (app/draining.py),
    # long enough for a balancer's checks to take the replica out (deploy/haproxy: 3 s at most;
    # the Kubernetes readiness probe: 4 s; docs/RELIABILITY.md, "Replicas that come and go"),
    # then FER_GRACEFUL_SHUTDOWN_S for what is in flight once the listener has closed.
    drain_s: float = Field(5.0, ge=0, le=600)
    graceful_shutdown_s: float = Field(20.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _engine_knobs_by_their_flat_names(cls, values: Any) -> Any:
        """Gather the engine's knobs, given by their flat names, into `engine`."""
        if not isinstance(values, dict):
            return values
        flat = {name: values.pop(name) for name in engine_fields() if name in values}
        if flat:
            nested = values.get("engine") or {}
            values["engine"] = {**(dataclasses.asdict(nested) if isinstance(nested, EngineConfig) else nested), **flat}
        return values

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: str) -> str:
        for origin in (part.strip() for part in value.split(",") if part.strip()):
            if origin == "*" or not re.fullmatch(r"https?://[^/\s*]+", origin):
                raise ValueError(f"{origin!r}: give exact origins like https://app.example.com, never '*'")
        return value

    @property
    def allowed_origins(self) -> list[str]:
        """FER_CORS_ORIGINS as a list."""
        return [part.strip() for part in self.cors_origins.split(",") if part.strip()]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The usual sources, with the engine's knobs read from the environment by their flat names."""
        return (
            init_settings,
            FlatOnly(env_settings),
            EngineEnvironment(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )


class FlatOnly(PydanticBaseSettingsSource):
    """The usual environment source without a nested `FER_ENGINE` (JSON) that would beat the flat names."""

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self.source = source

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return {name: value for name, value in self.source().items() if name != "engine"}


class EngineEnvironment(PydanticBaseSettingsSource):
    """The engine's knobs from `FER_*` variables, as `{"engine": {...}}` (`models.config` reads them)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything is in __call__

    def __call__(self) -> dict[str, Any]:
        values = engine_values_from_environ(os.environ)
        return {"engine": values} if values else {}


def setting_fields() -> dict[str, FieldInfo | dataclasses.Field[Any]]:
    """Every setting by its field name, the engine's knobs among them (the README's table)."""
    own = {name: field for name, field in Settings.model_fields.items() if name != "engine"}
    return {**{item.name: item for item in dataclasses.fields(EngineConfig)}, **own}


def setting_value(settings: Settings, name: str) -> Any:
    """A setting's value by its flat name."""
    return getattr(settings.engine, name) if name in engine_fields() else getattr(settings, name)
