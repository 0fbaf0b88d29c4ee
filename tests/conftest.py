import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import OtlpHttpReceiver, Rotel, build_program  # noqa: E402


@pytest.fixture(scope="session")
def receiver():
    r = OtlpHttpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="session")
def rotel(receiver, tmp_path_factory):
    collector = Rotel(receiver.port, tmp_path_factory.mktemp("rotel") / "rotel.log")
    yield collector
    collector.close()


@pytest.fixture(scope="session")
def programs():
    return {name: build_program(name) for name in ("tree", "panicker", "ticker")}
