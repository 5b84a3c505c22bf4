"""A throwaway PostgreSQL cluster in a temporary folder, on a free local port: Debian's
``postgresql`` binaries (``.ci/postgres-deps.sh`` installs them), run by an unprivileged user.

PostgreSQL refuses to run as root, and CI runs as root: there the server runs as the
``postgres`` user the Debian package creates (or a system user made here when it is missing),
owning the temporary folder. Only 127.0.0.1 listens; authentication is ``trust``, for this
one local user and database.
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
from pathlib import Path

import pytest

USER = "evolve"  # the database role and database the tests use
SYSTEM_USER = "postgres"


class ClusterUnavailable(RuntimeError):
    pass


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/VERSION/bin holding initdb and pg_ctl (Debian's layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parent.parent.name))
    on_path = shutil.which("pg_ctl")
    if found:
        return Path(found[-1]).parent
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """None: run as this user. As root: the ``postgres`` system user, created when missing."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                       check=True)
        return pwd.getpwnam(SYSTEM_USER)


class PostgresCluster:
    """``initdb`` once, then ``start``/``stop``/``restart`` at will; ``remove`` deletes everything.

    ``durable=False`` turns off fsync (tests: nothing here must survive a power loss);
    the benchmark keeps PostgreSQL's defaults.
    """

    def __init__(self, durable: bool = False):
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise ClusterUnavailable("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin "
                                     "or on PATH; install Debian's postgresql (.ci/postgres-deps.sh)")
        self.bin_dir = bin_dir
        self.user = _server_user()
        # mkdtemp, not pytest's tmp_path: root's pytest folders are mode 700, closed to the server's user
        self.root = Path(tempfile.mkdtemp(prefix="mergekit-evolve-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-instructions")
        conf = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            "unix_socket_directories = ''",  # TCP only: no socket file in a system folder
            "max_connections = 200",  # each worker pools a few connections
        ]
        if not durable:
            conf += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as fp:
            fp.write("\n".join(conf) + "\n")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, USER)

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{USER}"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin_dir / tool), *args]
        result = subprocess.run(cmd, user=self.user.pw_uid if self.user else None,
                                group=self.user.pw_gid if self.user else None, cwd=self.root,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise ClusterUnavailable(f"{tool} {' '.join(args)} failed ({result.returncode}): "
                                     f"{result.stdout.strip()}\n{log}")

    def start(self) -> None:
        self._run("pg_ctl", "start", "-w", "-t", "120", "-D", str(self.data), "-l", str(self.log))

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects every client and stops cleanly (a restart or failover as clients see it)."""
        self._run("pg_ctl", "stop", "-w", "-t", "120", "-m", mode, "-D", str(self.data))

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except ClusterUnavailable:  # already stopped
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"{reason} (CI must run the PostgreSQL tests: .ci/run installs the server)")
    pytest.skip(reason)


@pytest.fixture
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL server for one test (tests/conftest.py offers it to every test)."""
    try:
        import psycopg  # noqa: F401  SQLAlchemy's driver for postgresql:// URLs
    except ImportError:
        unavailable("no PostgreSQL driver: pip install 'psycopg[binary]' (in the test extra)")
    try:
        cluster = PostgresCluster()
    except ClusterUnavailable as e:
        unavailable(str(e))
    yield cluster
    cluster.remove()
