"""Engine, session factory, declarative base and the one transaction scope that commits."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, ORMExecuteState, Session, SessionTransaction, sessionmaker

from app.config import Settings, get_settings

logger = logging.getLogger(__name__)

# Deterministic constraint names: Alembic's batch mode (SQLite) and downgrades need to name them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every table in app/orm."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def create_db_engine(settings: Settings, *, for_migrations: bool = False) -> Engine:
    """An engine for settings.database_url (SQLite gets foreign keys, WAL and a busy timeout)."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        in_memory = url.database in (None, "", ":memory:")  # one connection per thread, no pool size
        if url.database and not in_memory:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        pool = {} if in_memory else {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow}
        engine = create_engine(url, connect_args={"check_same_thread": False}, **pool)
        _install_sqlite_pragmas(engine, busy_timeout_ms=settings.db_busy_timeout_ms,
                                foreign_keys=not for_migrations)
        if for_migrations:
            _make_sqlite_ddl_transactional(engine)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = settings.db_connect_timeout_s
        if settings.db_statement_timeout_ms and not for_migrations:
            # A statement blocked on a lock (or a sick server) would otherwise hold its request thread for
            # as long as the lock is held; cancelled, the request answers 503 database-unavailable.
            connect_args["options"] = f"-c statement_timeout={int(settings.db_statement_timeout_ms)}"
    return create_engine(url, pool_pre_ping=True, pool_size=settings.db_pool_size,
                         max_overflow=settings.db_max_overflow, connect_args=connect_args)


def _install_sqlite_pragmas(engine: Engine, *, busy_timeout_ms: int, foreign_keys: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # SQLite ignores foreign keys unless asked, per connection; WAL lets readers run beside a writer.
            # Migrations turn them off: batch mode rebuilds tables, and env.py checks integrity afterwards.
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit (an audit row whose verdict was already answered) survives a power loss too;
            # WAL with NORMAL may drop the last commits then. The fsync per commit is a small price here.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        finally:
            cursor.close()


def _make_sqlite_ddl_transactional(engine: Engine) -> None:
    # pysqlite commits before DDL by default; taking over BEGIN makes a failed migration roll back whole.
    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


class WriteLock(Protocol):
    """What the write queue needs of its mutex (threading.Lock; tests put probes in its place)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


_HOLDS_WRITE_QUEUE = "rxverify.holds_write_queue"


def _queue_sqlite_writes(factory: sessionmaker[Session], lock_of: Callable[[], WriteLock | None], *,
                         timeout_s: float) -> None:
    """Make every session of `factory` take `lock` at its transaction's first write, and let go at its end.

    SQLite's write lock is taken at a transaction's first INSERT/UPDATE/DELETE and held until COMMIT or
    ROLLBACK; the mutex spans exactly that (a flush with changes, or an ORM DML statement, up to the end
    of the outermost transaction), so an in-process writer never sleeps in SQLite's busy handler behind
    another in-process one: it waits on the mutex and wakes the moment the other commits or rolls back.
    It is released only after COMMIT/ROLLBACK, so a failed write (an IntegrityError) lets go of SQLite
    before the next writer starts. Waiting longer than the busy timeout raises OperationalError (503),
    as SQLite's own "database is locked" would. One session writes at a time per thread, as before: a
    thread that opened a second writing session while its first held the lock would have hit SQLite's
    busy timeout; now it hits the same timeout here. The mutex belongs to one Database object: sessions
    of another Database in the same process (the worker's reaper has its own) meet these only in SQLite.
    """

    def take(session: Session) -> None:
        lock = lock_of()
        if lock is None or session.info.get(_HOLDS_WRITE_QUEUE):
            return
        # Connection first, then the mutex, for every writer: one that held the mutex while waiting for a
        # pooled connection, behind writers that held connections while waiting for the mutex, would stall
        # them all until the timeouts. This also begins the transaction whose end lets the mutex go.
        session.connection()
        if not lock.acquire(timeout=timeout_s):
            raise OperationalError("(waiting for the SQLite write queue)", None,
                                   TimeoutError(f"another writer held the database for over {timeout_s:g} s"))
        session.info[_HOLDS_WRITE_QUEUE] = lock

    @event.listens_for(factory, "before_flush")
    def _before_flush(session: Session, _context: Any, _instances: Any) -> None:
        if session.new or session.deleted or any(session.is_modified(o) for o in session.dirty):
            take(session)

    @event.listens_for(factory, "do_orm_execute")
    def _before_dml(state: ORMExecuteState) -> None:
        if state.is_insert or state.is_update or state.is_delete:
            take(state.session)

    @event.listens_for(factory, "after_transaction_end")
    def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:  # the outermost one: SQLite has committed or rolled back
            held = session.info.pop(_HOLDS_WRITE_QUEUE, None)
            if held is not None:
                held.release()


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (responses are built from them)."""
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Open a session, commit when the block succeeds, roll back when it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class Database:
    """An engine plus its session factory for one Settings (one per app or CLI process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = create_db_engine(settings)
        self.session_factory = create_session_factory(self.engine)
        # SQLite takes one writer at a time, and a connection that finds the write lock taken sleeps in
        # SQLite's busy handler (steps of 1, 2, 5 ... 100 ms) instead of waking when it is free: under
        # concurrent verifications that made p99 latency approach a second. In-process writers queue on
        # this mutex instead (see _queue_sqlite_writes); the busy timeout still covers other processes
        # (the worker). PostgreSQL: none.
        self._write_lock: WriteLock | None = threading.Lock() if self.engine.dialect.name == "sqlite" else None
        if self._write_lock is not None:
            _queue_sqlite_writes(self.session_factory, lambda: self._write_lock,
                                 timeout_s=settings.db_busy_timeout_ms / 1000)

    @property
    def queues_writes(self) -> bool:
        """Whether this process's writers take turns on a mutex (SQLite) before SQLite's own write lock."""
        return self._write_lock is not None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A committed-or-rolled-back session (see session_scope)."""
        with session_scope(self.session_factory) as session:
            yield session

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


@lru_cache(maxsize=1)
def get_database() -> Database:
    """The process-wide Database for get_settings() (worker and CLI; the API keeps its own on app.state)."""
    return Database(get_settings())
