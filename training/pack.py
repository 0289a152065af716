"""Pack the dataset's image files into one file, and unpack it back into the folder layout.

An accelerator machine that is sent a working tree (with a size limit, and no access to
../shared) can train on FER2013 only if the data travels with the tree: 32,000 loose files are
slow to send, and the decoded pixels do not fit the limit, while the JPEG bytes packed into one
array file do (49.7 MiB for train and val). Unpacking writes the same bytes back into the
Kaggle folder layout, so training reads them through the usual path:

    python -m training.pack pack --out packs/fer2013.npz          # here; packs/ is git-ignored
    python -m training.pack unpack packs/fer2013.npz /tmp/fer2013  # there
    FER2013_DIR=/tmp/fer2013 python -m training.train --recipe default --epochs 200
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from training.data import default_data_dir, list_split
from training.helpformat import DefaultsHelpFormatter

DEFAULT_SPLITS = ("train", "val")
PARTS = ("names", "offsets", "data", "sha256")  # the arrays each split has in a pack


def pack(data_dir: Path, out: Path, splits: tuple[str, ...] = DEFAULT_SPLITS) -> dict[str, int]:
    """Write every image file of `splits` into one .npz; returns the number of files per split."""
    arrays: dict[str, Any] = {}  # Any: np.savez types its keyword arguments as its own options
    counts = {}
    for split in splits:
        _, files = list_split(data_dir / split)
        blobs = [path.read_bytes() for path, _ in files]
        joined = b"".join(blobs)
        names = [path.relative_to(data_dir / split).as_posix() for path, _ in files]
        arrays[f"{split}/names"] = np.array([name.encode() for name in names], dtype=bytes)  # UTF-8: 1/4 of str
        arrays[f"{split}/offsets"] = np.cumsum([0, *(len(blob) for blob in blobs)], dtype=np.int64)
        arrays[f"{split}/data"] = np.frombuffer(joined, dtype=np.uint8)
        arrays[f"{split}/sha256"] = np.array(hashlib.sha256(joined).hexdigest())
        counts[split] = len(files)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with partial.open("wb") as handle:  # JPEG bytes do not compress: a plain .npz is as small
        np.savez(handle, **arrays)
    partial.replace(out)
    return counts


def unpack(packed: Path, dest: Path) -> dict[str, int]:
    """Write the packed files back under `dest` in the folder layout; returns files per split.

    Raises:
        ValueError: not a pack, a damaged one (its bytes no longer match the checksum taken when
            packing), or one that names a path outside its split.
    """
    counts = {}
    try:
        archive = np.load(packed, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{packed}: not a pack written by training.pack ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{packed}: not a pack written by training.pack (a single array, not an .npz)")
    with archive:
        splits = sorted({key.split("/", 1)[0] for key in archive.files})
        expected = {f"{split}/{part}" for split in splits for part in PARTS}
        if not splits or set(archive.files) != expected:
            raise ValueError(f"{packed}: not a pack written by training.pack (its arrays: {sorted(archive.files)})")
        for split in splits:
            names = archive[f"{split}/names"]
            offsets = archive[f"{split}/offsets"]
            data = archive[f"{split}/data"]
            if hashlib.sha256(data.tobytes()).hexdigest() != str(archive[f"{split}/sha256"]):
                raise ValueError(f"{packed}: the {split} split's bytes do not match their checksum (damaged pack)")
            root = (dest / split).resolve()
            for index, name in enumerate(names):
                target = (root / bytes(name).decode()).resolve()
                if not target.is_relative_to(root):
                    raise ValueError(f"{packed}: {name!r} points outside the {split} folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[offsets[index] : offsets[index + 1]].tobytes())
            counts[split] = len(names)
    return counts


def build_parser() -> argparse.ArgumentParser:
    """The CLI: `pack` and `unpack` sub-commands."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pack_parser = commands.add_parser(
        "pack", help="pack a dataset folder into one file", formatter_class=DefaultsHelpFormatter
    )
    pack_parser.add_argument(
        "--data-dir", type=Path, default=None, help="dataset root in the Kaggle layout (default: $FER2013_DIR)"
    )
    pack_parser.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    pack_parser.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS), help="split folders to pack")
    unpack_parser = commands.add_parser(
        "unpack", help="write a pack back into the folder layout", formatter_class=DefaultsHelpFormatter
    )
    unpack_parser.add_argument("packed", type=Path, help="a file written by `pack`")
    unpack_parser.add_argument("dest", type=Path, help="dataset root to create (use it as FER2013_DIR)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pack":
            counts = pack(args.data_dir or default_data_dir(), args.out, tuple(args.splits))
            size_mib = args.out.stat().st_size / 2**20
            print(f"packed {counts} into {args.out} ({size_mib:.1f} MiB)")
        else:
            counts = unpack(args.packed, args.dest)
            print(f"unpacked {counts} into {args.dest}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
