"""Dependencies the routes take: the engine, the settings, the telemetry, the drain."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.draining import Drain
from app.settings import Settings
from app.telemetry import Telemetry
from models.engine import Engine


def get_engine(request: Request) -> Engine:
    """The engine loaded in the lifespan."""
    engine: Engine = request.app.state.engine
    return engine


def get_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    settings: Settings = request.app.state.settings
    return settings


def get_telemetry(request: Request) -> Telemetry:
    """The app's Prometheus registry."""
    telemetry: Telemetry = request.app.state.telemetry
    return telemetry


def get_drain(request: Request) -> Drain:
    """Whether the service is draining before its shutdown (app/draining.py)."""
    drain: Drain = request.app.state.drain
    return drain


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TelemetryDep = Annotated[Telemetry, Depends(get_telemetry)]
DrainDep = Annotated[Drain, Depends(get_drain)]
