"""A real PostgreSQL server for tests: initdb + pg_ctl on 127.0.0.1 in a temp dir, stopped by pid.

Debian's binaries live in /usr/lib/postgresql/<version>/bin; as root the server runs as user
``postgres`` (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server(tmp: Path) -> Iterator[str]:
    """Yield a ``postgresql://`` URL of a fresh server; stop it by pid afterwards."""
    binaries = pg_bin()
    assert binaries is not None
    user = "postgres" if os.geteuid() == 0 else None
    data = tmp / "pgdata"
    tmp.chmod(0o777)
    if user:
        shutil.chown(tmp, user)
    port = _free_port()
    subprocess.run([str(binaries / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "--no-sync"], check=True, user=user, capture_output=True)
    subprocess.run([str(binaries / "pg_ctl"), "-D", str(data), "-l", str(tmp / "pg.log"), "-w",
                    "-o", f"-h 127.0.0.1 -p {port} -k {tmp} -F", "start"],
                   check=True, user=user, capture_output=True)
    pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        os.kill(pid, signal.SIGINT)  # "fast" shutdown
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


@contextmanager
def scratch_server() -> Iterator[str]:
    """A server in a fresh directory, removed afterwards; skips the test without PostgreSQL.
    Under /tmp, not pytest's 0700 tmp root: the server runs as user postgres."""
    if pg_bin() is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    tmp = Path(tempfile.mkdtemp(prefix="saeflow-pg-"))
    try:
        with postgres_server(tmp) as url:
            yield url
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def store_url(request: pytest.FixtureRequest, tmp_path: Path, tables: tuple[str, ...]) -> str:
    """The feature store of a test parametrised over ``sqlite`` / ``postgres``: a fresh SQLite
    file, or the module's scratch PostgreSQL server (its ``pg_url`` fixture) with ``tables``
    emptied."""
    if request.param == "sqlite":
        return str(tmp_path / "features.sqlite")
    from saeflow.analysis import store

    url = request.getfixturevalue("pg_url")
    s = store.open_store(url)
    for table in tables:
        s._exec(f"DELETE FROM {table}")
    s.close()
    return url
