"""benchmarks.train_speed --profile: the convolutions' share of a training step, through the CLI, on random faces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_profile_splits_each_sides_step_into_convolutions_and_the_rest(tmp_path: Path) -> None:
    results = tmp_path / "profile.json"
    # No FER2013 here: the benchmark trains on random faces of the same shape (256 images, two batches).
    environment = {**os.environ, "FER2013_DIR": str(tmp_path / "absent")}
    command = [sys.executable, "-m", "benchmarks.train_speed", "--profile", "--images", "256", "--json", str(results)]
    printed = subprocess.run(command, cwd=ROOT, env=environment, check=True, capture_output=True, text=True).stdout

    profiles = json.loads(results.read_text())["profiles"]
    assert set(profiles) == {"before", "after"}
    for figures in profiles.values():
        # Zero here would mean the profiler's convolution events were not found (renamed in another torch).
        assert figures["conv_forward_ms"] > 0 and figures["conv_backward_ms"] > 0
        assert figures["conv_forward_gflops"] > 0 and figures["step_ms"] > 0
    assert "bound on the speed-up with these convolutions" in printed
