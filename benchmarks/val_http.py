"""All of FER2013 val through the running service's /predict/batch, scored against both truths and /metrics.

Starts `python -m app` on loopback with the shipped checkpoint (`FER_PRECISION` and `FER_TTA` as
in the environment), sends every val file 64 a request, and prints the accuracy of the answers
against the original labels and against the FER+ majority beside what `/metrics` stores for the
served precision and TTA: the two should agree within a few tenths of a point.

python -m benchmarks.val_http
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx
import numpy as np

from benchmarks.http import free_port, start_server
from benchmarks.machine import machine_line
from training.data import default_data_dir, list_split
from training.ferplus import VOTES_FILE, ferplus_majority, read_votes


def main() -> int:
    """Print the served answers' accuracy on val beside the stored figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="FER2013 root (default: $FER2013_DIR)")
    args = parser.parse_args()
    data_dir = args.data_dir or default_data_dir()
    classes, files = list_split(data_dir / "val")
    paths = tuple(str(path.relative_to(data_dir / "val")) for path, _ in files)
    labels = np.array([label for _, label in files])
    try:
        majority = ferplus_majority(read_votes(data_dir / VOTES_FILE, "val", paths), classes)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    print(machine_line())
    port = free_port()
    env = {**os.environ, "FER_PORT": str(port), "FER_LOG_LEVEL": "warning"}
    process, _ = start_server([sys.executable, "-m", "app"], env, port, "/ready")
    try:
        url = f"http://127.0.0.1:{port}"
        predicted: list[int] = []
        with httpx.Client(timeout=300) as client:
            for start in range(0, len(files), 64):
                chunk = files[start : start + 64]
                upload = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path, _ in chunk]
                response = client.post(f"{url}/predict/batch", files=upload)
                if response.status_code != 200:
                    parser.error(f"/predict/batch answered {response.status_code}: {response.text[:200]}")
                # an image the service refused counts as wrong (-1 matches no label)
                results = response.json()["results"]
                predicted += [classes.index(r["label"]) if r.get("label") else -1 for r in results]
            stored = client.get(f"{url}/metrics").json()
    finally:
        process.terminate()
        process.wait()
    answers = np.array(predicted)
    counted = majority >= 0
    served = (answers == labels).mean(), (answers[counted] == majority[counted]).mean()
    recorded = stored["accuracy"], stored["ferplus"]["accuracy"] if stored.get("ferplus") else float("nan")
    print(f"served precision {stored['served_precision']}, tta {stored['served_tta']}, {len(files)} val images")
    for name, answered, kept in zip(("original labels", "FER+ majority"), served, recorded, strict=True):
        print(
            f"{name}: /predict/batch {answered:.4f}, /metrics {kept:.4f}, difference {100 * (answered - kept):+.2f} points"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
