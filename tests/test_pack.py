"""The dataset travels to an accelerator machine as one file and comes back out byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from training.pack import build_parser, main, pack, unpack


def files_under(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def run_pack(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "training.pack", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_pack_then_unpack_gives_back_the_same_files(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    packed = tmp_path / "packs" / "fer.npz"
    # The one run of the real `python -m training.pack`; the other tests call its main() in process.
    packing = run_pack("pack", "--data-dir", str(tiny_dataset), "--out", str(packed))
    assert packing.returncode == 0, packing.stderr
    assert "'train': 140" in packing.stdout and "'val': 28" in packing.stdout
    assert main(["unpack", str(packed), str(tmp_path / "out")]) == 0
    assert "'train': 140" in capsys.readouterr().out
    original = files_under(tiny_dataset)
    assert files_under(tmp_path / "out") == original and len(original) == 168


def rewrite(packed: Path, change: dict[str, np.ndarray]) -> None:
    with np.load(packed) as archive:
        arrays = {key: archive[key] for key in archive.files}
    np.savez(packed, **{**arrays, **change})


def test_a_damaged_pack_is_refused_with_a_reason(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    packed = tmp_path / "fer.npz"
    pack(tiny_dataset, packed)
    with np.load(packed) as archive:
        data = archive["val/data"].copy()
    data[len(data) // 2] ^= 0xFF
    rewrite(packed, {"val/data": data})
    assert main(["unpack", str(packed), str(tmp_path / "out")]) == 1
    assert "val split's bytes do not match their checksum" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a pack at all",
        pytest.param(
            b"PK\x03\x04 truncated zip",
            # np.load(path) leaks its file handle when the zip is unreadable (numpy 2's _npyio_impl.load
            # hands the handle to NpzFile before NpzFile can fail); training.pack could open the file itself.
            marks=pytest.mark.filterwarnings("ignore:unclosed file:ResourceWarning"),
        ),
    ],
)
def test_a_file_that_is_not_a_pack_is_refused_with_a_reason(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    packed = tmp_path / "fer.npz"
    packed.write_bytes(content)
    assert main(["unpack", str(packed), str(tmp_path / "out")]) == 1
    assert "not a pack written by training.pack" in capsys.readouterr().err


def test_a_pack_cannot_write_outside_its_folder(tiny_dataset: Path, tmp_path: Path) -> None:
    packed = tmp_path / "fer.npz"
    pack(tiny_dataset, packed, splits=("val",))
    with np.load(packed) as archive:
        names = archive["val/names"].astype(object)
    names[0] = b"../../escaped.png"
    rewrite(packed, {"val/names": names.astype(bytes)})
    with pytest.raises(ValueError, match="outside the val folder"):
        unpack(packed, tmp_path / "out")
    assert not (tmp_path / "escaped.png").exists()


@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_every_pack_flag_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "(default: None)" not in out
    subparsers = next(action for action in build_parser()._actions if action.choices)
    for action in subparsers.choices[command]._actions:  # type: ignore[index]
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
