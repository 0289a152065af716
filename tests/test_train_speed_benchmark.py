"""benchmarks.train_speed --profile: each convolution's share of a training step, through the CLI, on random faces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The seed network's convolutions, (out, in, kh, kw), and their output sizes: 48, 24, 12, 6 pixels a side.
LAYERS = {"64x1x3x3": 48, "128x64x5x5": 24, "256x128x3x3": 12, "256x256x3x3": 6}


def test_profile_counts_each_convolutions_work_and_time_on_both_sides(tmp_path: Path) -> None:
    results = tmp_path / "profile.json"
    # No FER2013 here: the benchmark trains on random faces of the same shape (256 images, two batches).
    environment = {**os.environ, "FER2013_DIR": str(tmp_path / "absent")}
    command = [sys.executable, "-m", "benchmarks.train_speed", "--profile", "--images", "256", "--rounds", "1"]
    printed = subprocess.run(
        [*command, "--json", str(results)], cwd=ROOT, env=environment, check=True, stdout=subprocess.PIPE, text=True
    ).stdout

    medians = json.loads(results.read_text())["medians"]
    for side in ("before", "after"):
        layers = medians[side]["layers"]
        assert set(layers) == set(LAYERS)  # the val split's batch of 8 is left out, and nothing else is missed
        for name, size in LAYERS.items():
            out_channels, in_channels, kernel_height, kernel_width = map(int, name.split("x"))
            gflop = 2e-9 * 128 * out_channels * in_channels * kernel_height * kernel_width * size * size
            assert layers[name]["forward_gflop"] == pytest.approx(gflop)
            # The input's gradient and the weight's; the network's input gets none.
            assert layers[name]["backward_gflop"] == pytest.approx(gflop * (1 if in_channels == 1 else 2))
            assert layers[name]["forward_ms"] > 0 and layers[name]["backward_ms"] > 0
    assert "bound on the speed-up" in printed
