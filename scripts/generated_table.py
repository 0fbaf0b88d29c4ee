"""The command line the generators share: write the generated file, or check the shipped one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable


def render(table: dict) -> str:
    return json.dumps(table, indent=1) + "\n"


def main(description: str, table_path: Path, generate: Callable[[], object], source: str, script: str,
         to_text: Callable[[object], str] = render) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="compare with the shipped table instead of writing it")
    args = parser.parse_args()
    text = to_text(generate())
    if args.check:
        if table_path.is_file() and table_path.read_text() == text:
            print(f"{table_path} is up to date")
            return 0
        print(f"{table_path} differs from what {source} give; run {script}", file=sys.stderr)
        return 1
    table_path.parent.mkdir(exist_ok=True)
    table_path.write_text(text)
    print(f"wrote {table_path}")
    return 0
