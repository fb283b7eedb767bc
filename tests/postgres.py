"""A real, throw-away PostgreSQL server for the multi-worker tests (no mocks).

Debian's server binaries live in /usr/lib/postgresql/<version>/bin; `initdb` refuses to run as root, so
when the tests run as root the cluster is created and served by an unprivileged account. The server
listens on 127.0.0.1 only, on a free port, with its data and socket in a temporary directory that is
removed afterwards.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

UNPRIVILEGED_USER = "nobody"


def postgres_bin_dir() -> Path | None:
    """The newest installed server's binary directory, or None when PostgreSQL is not installed."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


def install_postgres() -> Path:
    """Install Debian's server package when missing (the test machine allows apt); return its bin dir."""
    found = postgres_bin_dir()
    if found is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = postgres_bin_dir()
    if found is None:
        raise RuntimeError("postgresql was installed but no /usr/lib/postgresql/*/bin/initdb exists")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgres_server(database: str = "evomerge") -> Iterator[str]:
    """Start a fresh cluster, create `database`, yield its SQLAlchemy URL; stop and delete it on exit."""
    bin_dir = install_postgres()
    root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
    run_as: dict = {}
    if os.geteuid() == 0:
        account = pwd.getpwnam(UNPRIVILEGED_USER)
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = {"user": account.pw_uid, "group": account.pw_gid}
    data, log = root / "data", root / "server.log"
    port = free_port()
    user = "evomerge"

    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, cwd=root, **run_as)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=100"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        try:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, database)
            yield f"postgresql+psycopg2://{user}@127.0.0.1:{port}/{database}"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # a manual smoke check: start, connect, stop
    import sqlalchemy

    with postgres_server() as url, sqlalchemy.create_engine(url).connect() as connection:
        print(url, connection.execute(sqlalchemy.text("select version()")).scalar())
