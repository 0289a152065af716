from __future__ import annotations

import subprocess
import sys

from tests.server import ROOT


def test_inference_core_imports_nothing_from_http() -> None:
    code = (
        "import sys, models.engine, models.predictor, models.checkpoint, models.preprocessing, models.faces;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn', 'app')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
