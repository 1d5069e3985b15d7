"""A throwaway PostgreSQL server for the test suite (a test helper, not product code).

One server per test session, made from the PostgreSQL binaries on the machine: ``initdb`` and ``pg_ctl``
on ``PATH``, else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian's ``postgresql`` package),
or the directory in ``$PATCHLAB_PG_BINDIR``. The cluster lives in a fresh temporary directory
(data, log, and the unix socket directory), listens on 127.0.0.1 on a free ephemeral port, trusts local
connections, runs with fsync off (nothing in it needs to survive), and is stopped and deleted at the
end of the session. PostgreSQL refuses to run as root, so under root the server runs as the
unprivileged ``postgres`` user (else ``nobody``): the child drops to it before exec, no ``sudo`` needed.

Fixtures: ``pg_server`` (session), ``pg_database_url`` (a new empty database per test, dropped after
it) and ``pg_server_alone`` (a server of one test's own, which it may :meth:`PgServer.take_down` and
:meth:`PgServer.bring_back`). Without binaries or psycopg the tests that use them skip, saying why;
under ``CI=true`` they fail instead, so CI can never pass by skipping PostgreSQL.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

SUPERUSER = "patchlab"
START_TIMEOUT_S = 60
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",  # a throwaway cluster: durability only costs time here
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


class PgUnavailable(RuntimeError):
    """No server can be started here; the message says why."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    env = os.environ.get("PATCHLAB_PG_BINDIR")
    candidates = [Path(env)] if env else []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in p.name.split(".") if x.isdigit())

    debian = sorted(Path("/usr/lib/postgresql").glob("*"), key=version, reverse=True)
    candidates += [d / "bin" for d in debian]
    for d in candidates:
        if all((d / exe).is_file() and os.access(d / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """A PostgreSQL cluster in a temporary directory; :meth:`start` it, :meth:`stop` it (idempotent)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port: int | None = None
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    self._user = pwd.getpwnam(name)
                    break
            if self._user is None:
                raise PgUnavailable("running as root and neither a 'postgres' nor a 'nobody' user exists")
        # /tmp rather than $TMPDIR: the server's user must reach it, and the socket path must stay short
        self.root = Path(tempfile.mkdtemp(prefix="patchlab-pg-", dir="/tmp" if Path("/tmp").is_dir() else None))
        self.data, self.sockdir, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.sockdir.mkdir()
        if self._user is not None:
            for p in (self.root, self.sockdir):
                os.chown(p, self._user.pw_uid, self._user.pw_gid)
        self._admin = None
        self._names = itertools.count(1)
        self._started = False
        self._down = False  # stopped by take_down, to be brought back

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        kw: dict = {}
        if self._user is not None:
            kw = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self.root))
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,  # the unprivileged user may not be able to read the caller's directory
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise PgUnavailable(f"{what} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}\n{log}")

    def start(self) -> PgServer:
        proc = self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"
        )
        self._check(proc, "initdb")
        base_conf = (self.data / "postgresql.conf").read_text()
        settings = {**SERVER_SETTINGS, "unix_socket_directories": f"'{self.sockdir}'"}
        for attempt in range(3):  # the port is free when picked; another process may take it before we bind
            self.port = _free_port()
            conf = {**settings, "port": str(self.port)}
            (self.data / "postgresql.conf").write_text(base_conf + "".join(f"\n{k} = {v}" for k, v in conf.items()))
            proc = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S), "start"
            )
            if proc.returncode == 0:
                self._started = True
                atexit.register(self.stop)  # also when the session ends without running its finalizers
                return self
            if attempt == 2 or "already in use" not in self.log.read_text(errors="replace"):
                self._check(proc, f"pg_ctl start on 127.0.0.1:{self.port}")
        raise AssertionError("unreachable")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _admin_conn(self):
        import psycopg

        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(
                host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
            )
        return self._admin

    def create_database(self, template: str = "template1") -> str:
        """A new database, a copy of ``template`` (by default an empty one); returns its name."""
        conn = self._admin_conn()
        name = f"t{os.getpid()}_{next(self._names)}"
        # FILE_COPY (PostgreSQL 15+; the only way before) copies a small database faster than WAL_LOG
        strategy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}')
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, ending any connection a test leaked to it."""
        conn = self._admin_conn()
        if conn.info.server_version >= 130000:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')

    def take_down(self, mode: str = "fast") -> None:
        """Stop the server but keep its cluster (the database "going away"); :meth:`bring_back` restarts it.
        ``fast`` ends every session and shuts down cleanly, so what was committed stays."""
        self._close_admin()
        self._check(self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"), f"pg_ctl stop -m {mode}")
        self._down = True

    def bring_back(self) -> None:
        """Start a server :meth:`take_down` stopped, on the same port (nothing to do when it is up)."""
        if not self._down:
            return
        proc = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S), "start")
        self._check(proc, f"pg_ctl start again on 127.0.0.1:{self.port}")
        self._down = False

    def _close_admin(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None

    def stop(self) -> None:
        self._close_admin()
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PgServer:
    """Start a throwaway server, or raise :class:`PgUnavailable` saying why none can be started."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise PgUnavailable("psycopg is not installed (pip install -e '.[postgres]')") from None
    bindir = find_bindir()
    if bindir is None:
        raise PgUnavailable(
            "no PostgreSQL binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin "
            "(apt-get install postgresql, or set PATCHLAB_PG_BINDIR)"
        )
    server = PgServer(bindir)
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


def server_or_skip() -> PgServer:
    """:func:`start_server`, else skip the test saying why (fail under ``CI=true``)."""
    try:
        return start_server()
    except (PgUnavailable, OSError, subprocess.SubprocessError) as exc:
        msg = f"PostgreSQL tests need a server and none could be started: {exc}"
        if in_ci():
            pytest.fail(f"CI=true: {msg}", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server for the whole session (skips, or fails under CI=true, if none)."""
    server = server_or_skip()
    yield server
    server.stop()


@pytest.fixture
def pg_server_alone():
    """A throwaway server of the test's own, for a test that stops and restarts it (the shared one stays up)."""
    server = server_or_skip()
    yield server
    server.stop()


@pytest.fixture
def pg_database_url(pg_server: PgServer):
    """A fresh, empty database on the session's server, as a ``postgresql+psycopg://`` URL; dropped after."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)
