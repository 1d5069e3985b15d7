"""Where a registry lives, how to connect to it, and bringing its schema up to date.

A registry is one database URL plus a *home* directory holding the blob store and the cache.
Location, in order: an explicit argument (a directory, a ``.db`` file, or any SQLAlchemy URL),
else ``$PATCHLAB_HOME``, else the user's data directory (platformdirs).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import platformdirs
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from registry.errors import RegistryConnectionError, RegistryNotFoundError, RegistrySchemaError

DB_FILENAME = "registry.db"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: The newest schema revision this patchlab knows; a test checks it is the Alembic head.
SCHEMA_HEAD = "0007"
KNOWN_REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007")
BUSY_TIMEOUT_MS = 30_000
#: PostgreSQL: the transaction-scoped advisory lock every write transaction takes first, so writers
#: to one registry database run one at a time, as SQLite's ``BEGIN IMMEDIATE`` makes them.
PG_WRITE_LOCK_KEY = 0x7061_7463_686C_6162  # "patchlab"
PG_CONNECT_TIMEOUT_S = 10
#: SQLSTATEs after which a PostgreSQL transaction may simply be run again (serialization failure,
#: deadlock, lock wait past ``lock_timeout``).
PG_RETRY_SQLSTATES = ("40001", "40P01", "55P03")

T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A registry's database URL and its home directory (blobs, cache)."""

    url: str
    home: Path

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @property
    def is_postgresql(self) -> bool:
        return self.url.startswith("postgresql")

    @property
    def safe_url(self) -> str:
        """The URL with any password masked, for messages."""
        return _safe_url(self.url)

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a file-backed SQLite registry, else None."""
        if not self.is_sqlite:
            return None
        db = make_url(self.url).database
        if not db or db == ":memory:" or db.startswith("file:"):
            return None
        return Path(db)

    @property
    def read_only(self) -> bool:
        """A file-backed SQLite registry opened read-only: asked for (``?mode=ro`` in the URL, or
        ``PATCHLAB_READ_ONLY=1``), or its database file or directory cannot be written (a read-only mount)."""
        path = self.sqlite_path
        if path is None:
            return False
        if make_url(self.url).query.get("mode") == "ro" or os.environ.get("PATCHLAB_READ_ONLY") == "1":
            return True
        return path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def default_home() -> Path:
    """``$PATCHLAB_HOME`` if set, else the user's data directory for patchlab."""
    env = os.environ.get("PATCHLAB_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path(platformdirs.user_data_dir("patchlab", appauthor=False))


def resolve_location(url_or_path: str | os.PathLike[str] | None = None) -> Location:
    """Turn the user's argument (or nothing) into a :class:`Location`.

    A string with ``://`` is a SQLAlchemy URL; a path ending in ``.db``/``.sqlite`` is the database file
    (its directory is the home); any other path is the home directory holding ``registry.db``.
    """
    if url_or_path is None:
        home = default_home()
        return Location(f"sqlite:///{home / DB_FILENAME}", home)
    text_arg = os.fspath(url_or_path)
    if "://" in text_arg:
        try:
            url = make_url(text_arg)
        except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
            raise RegistryConnectionError(
                f"{_safe_url(text_arg)!r} is not a database URL; use e.g. postgresql://user@host:5432/dbname, "
                "sqlite:////path/registry.db, or a directory"
            ) from None
        if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
            db = Path(url.database).expanduser().resolve()
            return Location(url.set(database=str(db)).render_as_string(hide_password=False), db.parent)
        if url.drivername in ("postgresql", "postgres"):  # plain postgresql:// means psycopg 3, our extra
            url = url.set(drivername="postgresql+psycopg")
            return Location(url.render_as_string(hide_password=False), default_home())
        return Location(text_arg, default_home())
    path = Path(text_arg).expanduser().resolve()
    if path.suffix.lower() in SQLITE_SUFFIXES or path.is_file():
        return Location(f"sqlite:///{path}", path.parent)
    return Location(f"sqlite:///{path / DB_FILENAME}", path)


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url.split("@", 1)[-1] if "@" in url else url


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return lines[0] if lines else type(orig).__name__


def _create_engine(location: Location, **kw) -> Engine:
    """``create_engine``, with a missing driver or an unknown kind of database as one clear line."""
    try:
        return create_engine(location.url, **kw)
    except NoSuchModuleError:
        raise RegistryConnectionError(
            f"the registry URL {location.safe_url} names a database or driver SQLAlchemy does not know "
            f"({make_url(location.url).drivername!r}); use postgresql://... or sqlite:///..."
        ) from None
    except ImportError as exc:
        extra = " (pip install 'patchlab[postgres]')" if location.is_postgresql else ""
        raise RegistryConnectionError(
            f"the registry URL {location.safe_url} needs the Python package {exc.name or 'its driver'!r}, "
            f"which is not installed{extra}"
        ) from None


def make_engine(location: Location) -> Engine:
    """An engine with WAL, a busy timeout and foreign keys for SQLite; writes begin IMMEDIATE.

    On PostgreSQL, a write transaction (execution option ``write_lock``) first takes a transaction-level
    advisory lock, so writers queue as they do on SQLite and every read-then-write in ``registry.api``
    (next version number, family creation, alias moves) sees the rows the previous writer committed.
    """
    if location.is_postgresql:
        return _make_pg_engine(location)
    if not location.is_sqlite:
        return _create_engine(location, pool_pre_ping=True)
    read_only = location.read_only
    if read_only:
        # SQLite's own read-only open. With nothing pending in a write-ahead log (a registry every writer
        # closed cleanly), or where no -shm/-wal can be made (a read-only mount), the file is also declared
        # immutable: SQLite then creates nothing beside it and takes no locks.
        path = location.sqlite_path
        wal = path.with_name(path.name + "-wal")
        pending = wal.exists() and wal.stat().st_size > 0
        flags = "mode=ro" if pending and os.access(path.parent, os.W_OK) else "mode=ro&immutable=1"
        url = f"sqlite:///file:{path}?{flags}&uri=true"
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    else:
        engine = _create_engine(location, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # pragma: no cover - exercised by every test
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        if location.sqlite_path is not None and not read_only:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # A deferred transaction that later writes can fail with "database is locked" at once (the
        # busy handler cannot help a reader upgrading to writer); writers take the lock up front.
        if conn.get_execution_options().get("write_lock"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


#: How a JSON column on PostgreSQL holds a float JSON cannot (NaN, Infinity): PostgreSQL's json type
#: rejects Python's ``NaN``/``Infinity`` tokens, which SQLite stores and gives back as they are.
PG_NONFINITE_KEY = "$patchlab.float"


def _tag_nonfinite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return {PG_NONFINITE_KEY: repr(value).replace("inf", "Infinity").replace("nan", "NaN")}
    if isinstance(value, dict):
        return {k: _tag_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag_nonfinite(v) for v in value]
    return value


def pg_json_dumps(value) -> str:
    """JSON for a PostgreSQL json column; non-finite floats become ``{"$patchlab.float": "NaN"}``."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere: tag them (the rare, slower path)
        return json.dumps(_tag_nonfinite(value), allow_nan=False)


def _untag_nonfinite(obj: dict):
    if len(obj) == 1 and isinstance(obj.get(PG_NONFINITE_KEY), str):
        return float(obj[PG_NONFINITE_KEY])
    return obj


def pg_json_loads(text_: str | bytes):
    return json.loads(text_, object_hook=_untag_nonfinite)


def _make_pg_engine(location: Location) -> Engine:
    url = make_url(location.url)
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    engine = _create_engine(
        location,
        pool_pre_ping=True,
        connect_args=connect_args,
        json_serializer=pg_json_dumps,
        json_deserializer=pg_json_loads,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # a writer waits for the write lock at most as long as SQLite's busy timeout, then retry_locked
        # backs off and tries again
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET lock_timeout = {BUSY_TIMEOUT_MS}")
        dbapi_conn.commit()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        if conn.get_execution_options().get("write_lock"):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_WRITE_LOCK_KEY})")

    return engine


def is_locked_error(exc: BaseException) -> bool:
    """A lock or serialization conflict: running the whole transaction again may succeed."""
    if not isinstance(exc, DBAPIError):
        return False
    if getattr(exc.orig, "sqlstate", None) in PG_RETRY_SQLSTATES:
        return True
    msg = str(exc).lower()
    return isinstance(exc, OperationalError) and ("database is locked" in msg or "database is busy" in msg)


def retry_locked(fn: Callable[[], T], attempts: int = 8, delay: float = 0.05) -> T:
    """Run ``fn``; when the database reports a lock conflict past its timeout (SQLite: locked; PostgreSQL:
    lock timeout, deadlock, serialization failure), back off and rerun."""
    for i in range(attempts):
        try:
            return fn()
        except DBAPIError as exc:
            if not is_locked_error(exc) or i == attempts - 1:
                raise
            time.sleep(delay * (2**i))
    raise AssertionError("unreachable")


class Database:
    """Engine + session factories for one registry location."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.engine = make_engine(location)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self.engine.execution_options(write_lock=True), expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A short write transaction holding the registry's write lock from its start (SQLite: BEGIN
        IMMEDIATE; PostgreSQL: an advisory transaction lock)."""
        with self._writer() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def current_revision(conn) -> str | None:
    """The registry's schema revision, None for an empty database.

    Raises RegistrySchemaError when the database has tables but is not a patchlab registry.
    """
    insp = inspect(conn)
    tables = set(insp.get_table_names())
    if "alembic_version" in tables:
        rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        if len(rows) == 1:
            return rows[0]
        if not rows and not (tables - {"alembic_version"}):
            return None
        raise RegistrySchemaError(
            f"the registry database has {len(rows)} schema revisions recorded ({', '.join(rows) or 'none'}); "
            "it is damaged: restore it from a backup"
        )
    if tables:
        raise RegistrySchemaError(
            f"the database at {conn.engine.url!r} has tables ({', '.join(sorted(tables)[:5])}) but is not a "
            "patchlab registry; point patchlab at another location (--registry or PATCHLAB_HOME)"
        )
    return None


def _check_known(rev: str | None) -> None:
    if rev is not None and rev not in KNOWN_REVISIONS:
        from patchlab import __version__

        raise RegistrySchemaError(
            f"the registry's schema revision {rev!r} was made by a newer patchlab than this one "
            f"({__version__}, schema {SCHEMA_HEAD}); upgrade patchlab (pip install -U patchlab) to open it"
        )


def alembic_config():
    """An Alembic Config pointing at the shipped ``registry/migrations``."""
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade_schema(db: Database, target: str = "head") -> str:
    """Bring the schema to ``target`` under the write lock; returns the revision before upgrading."""
    from alembic import command

    def run() -> str:
        with db.engine.execution_options(write_lock=True).begin() as conn:
            before = current_revision(conn)
            _check_known(before)
            if target == "head" and before == SCHEMA_HEAD:
                return before
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, target)
            return before or ""

    return retry_locked(run)


def open_database(location: Location, *, create: bool) -> Database:
    """Connect, refuse unknown schemas, create or upgrade as needed."""
    path = location.sqlite_path
    if path is not None and not path.exists():
        if not create:
            raise RegistryNotFoundError(
                f"no registry at {path}; create one with `patchlab init` (or Registry.init), or point "
                "--registry / PATCHLAB_HOME at an existing one"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
    db = Database(location)
    try:
        try:
            conn = db.engine.connect()
        except DBAPIError as exc:
            if is_locked_error(exc):
                raise
            raise RegistryConnectionError(
                f"cannot connect to the registry database {location.safe_url}: {_first_line(exc)}"
            ) from None
        with conn:
            rev = current_revision(conn)
            conn.rollback()
        _check_known(rev)
        if rev is None and not create:
            raise RegistryNotFoundError(
                f"the database at {location.url} holds no registry yet; create one with `patchlab init`"
            )
        if rev != SCHEMA_HEAD:
            if location.read_only:
                raise RegistrySchemaError(
                    f"the registry at {location.url} is read-only and its schema ({rev}) is older than this "
                    f"patchlab's ({SCHEMA_HEAD}); open it once where it can be written to upgrade it"
                )
            upgrade_schema(db)
    except BaseException:
        db.dispose()
        raise
    return db
