"""`python -m app.keys` (and `fer keys`): add a client to the API keys file, or list who is in it.

    fer keys add NAME [--file PATH]   a new random key for NAME: printed once, its hash appended
    fer keys list [--file PATH]       the clients the file names

The file is `FER_API_KEYS_FILE` unless `--file` names another; it holds `name:sha256` lines,
never a key, so a key that is lost is replaced (remove its line, add the name again), not read back.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from app.clients import add_key, parse_keys


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="fer keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="make a key for a new client: printed once, its hash stored")
    add.add_argument("name", help="the client's name, as the access log and the metrics will show it")
    listing = commands.add_parser("list", help="the clients the file names")
    for command in (add, listing):
        command.add_argument("--file", type=Path, default=None, help="the keys file (default: $FER_API_KEYS_FILE)")
    args = parser.parse_args(argv)
    path = args.file or (Path(os.environ["FER_API_KEYS_FILE"]) if os.environ.get("FER_API_KEYS_FILE") else None)
    if path is None:
        print("fer keys: name the keys file with --file or FER_API_KEYS_FILE", file=sys.stderr)
        return 2
    try:
        if args.command == "add":
            key = add_key(path, args.name)
            print(key)
            print(f"fer keys: {args.name} added to {path}; the key above is shown once only", file=sys.stderr)
        else:
            for name in parse_keys(path.read_text(encoding="utf-8"), path).values():
                print(name)
    except (OSError, ValueError) as exc:
        print(f"fer keys: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
