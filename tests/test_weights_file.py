"""Reading torch's checkpoint files without torch: the same values as `torch.load(weights_only=True)`, nothing run."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models.weights_file import WeightsFileError, read_weights_file
from tests.conftest import SHIPPED_CHECKPOINT


def test_the_shipped_checkpoint_reads_as_torch_reads_it() -> None:
    ours, torchs = read_weights_file(SHIPPED_CHECKPOINT), torch.load(SHIPPED_CHECKPOINT, weights_only=True)
    assert ours.keys() == torchs.keys()
    assert {k: v for k, v in ours.items() if k != "state_dict"} == {
        k: v for k, v in torchs.items() if k != "state_dict"
    }
    assert ours["state_dict"].keys() == torchs["state_dict"].keys()
    for name, tensor in torchs["state_dict"].items():
        array = ours["state_dict"][name]
        assert array.shape == tuple(tensor.shape) and array.dtype == tensor.numpy().dtype, name  # 0-d stays 0-d
        assert np.array_equal(array, tensor.numpy()) and not array.flags.writeable, name


def test_strided_and_shared_tensors_read_as_torch_reads_them(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    payload = {
        "transposed": base.t(),  # a view with strides (1, 6) into the same storage
        "slice": base[1:3, 2:5],  # an offset into it
        "ints": torch.tensor([[1, -2], [3, 4]], dtype=torch.int16),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "views.pth"
    torch.save(payload, path)
    read = read_weights_file(path)
    for name, tensor in payload.items():
        assert np.array_equal(read[name], tensor.numpy()) and read[name].shape == tuple(tensor.shape), name


def _zip_with_pickle(path: Path, data: bytes) -> None:
    """A torch-shaped archive (archive/data.pkl, byteorder) around `data`."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pwned"))  # type: ignore[return-value]


def test_a_pickle_that_asks_for_other_globals_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    _zip_with_pickle(path, pickle.dumps({"state_dict": {}, "x": _RunsCode(marker)}, protocol=2))
    with pytest.raises(WeightsFileError, match=r"it asks for .*, which a weights-only file never holds"):
        read_weights_file(path)
    assert not marker.exists()


def test_damaged_archives_are_refused_in_one_line(tmp_path: Path) -> None:
    good = io.BytesIO()
    torch.save({"w": torch.ones(4)}, good)
    with zipfile.ZipFile(io.BytesIO(good.getvalue())) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    storage = next(name for name in entries if "/data/" in name)
    cases = {
        "no storage": {k: v for k, v in entries.items() if k != storage},
        "short storage": {**entries, storage: entries[storage][:6]},
        "big-endian": {**entries, next(n for n in entries if n.endswith("byteorder")): b"big"},
        "cut pickle": {**entries, next(n for n in entries if n.endswith("data.pkl")): entries[
            next(n for n in entries if n.endswith("data.pkl"))][:20]},
    }  # fmt: skip
    for case, files in cases.items():
        path = tmp_path / f"{case}.pth"
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        with pytest.raises(WeightsFileError) as refused:
            read_weights_file(path)
        assert "\n" not in str(refused.value), case
    (tmp_path / "plain.pth").write_bytes(b"not a zip")
    with pytest.raises(WeightsFileError, match="not a torch zip archive"):
        read_weights_file(tmp_path / "plain.pth")
