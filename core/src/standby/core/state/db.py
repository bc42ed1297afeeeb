"""State models and the `State` handle that opens (and migrates) the database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from standby.core.errors import NotFound


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        datetime: DateTime(timezone=True),
    }


class SiteRecord(Base):
    """A site the control plane has seen (its configuration lives in the site's TOML file)."""

    __tablename__ = "sites"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    plugin: Mapped[str] = mapped_column(String(64))
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


class Protection(Base):
    """One VM replicated from a source site to a target site under a policy."""

    __tablename__ = "protections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[str] = mapped_column(String(128))
    vm_name: Mapped[str] = mapped_column(String(128), unique=True)
    source_site: Mapped[str] = mapped_column(String(64))
    target_site: Mapped[str] = mapped_column(String(64))
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    target_size: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="protected")
    """protected | failed-over | committed (then `reprotect` swaps the direction)."""
    home_site: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The site the VM ran at when first protected (failback goes there)."""
    generation: Mapped[int] = mapped_column(Integer, default=1)
    """1 for the first direction; +1 at every re-protect (points of older generations retire)."""
    health: Mapped[str] = mapped_column(String(32), default="ok")
    health_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    points: Mapped[list[RecoveryPoint]] = relationship(
        back_populates="protection", order_by="RecoveryPoint.id"
    )


class Cycle(Base):
    """One replication cycle; `running` cycles carry resumable progress in `CycleDisk`."""

    __tablename__ = "cycles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    protection_id: Mapped[int] = mapped_column(ForeignKey("protections.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    phase: Mapped[str] = mapped_column(String(16), default="copy")
    kind: Mapped[str] = mapped_column(String(16), default="full")
    consistency: Mapped[str] = mapped_column(String(8), default="crash")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    snapshot_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    base_point_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    snapshot_tokens: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    bytes_planned: Mapped[int] = mapped_column(Integer, default=0)
    bytes_read: Mapped[int] = mapped_column(Integer, default=0)
    bytes_written: Mapped[int] = mapped_column(Integer, default=0)
    bytes_zeroed: Mapped[int] = mapped_column(Integer, default=0)
    resumed: Mapped[int] = mapped_column(Integer, default=0)
    rpo_seconds: Mapped[float | None] = mapped_column(nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")


class CycleDisk(Base):
    """Per-disk progress of a cycle: planned extents, done units, the manifest being built."""

    __tablename__ = "cycle_disks"
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), primary_key=True)
    disk: Mapped[str] = mapped_column(String(64), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(Integer)
    plan: Mapped[bytes] = mapped_column(LargeBinary)
    done: Mapped[bytes] = mapped_column(LargeBinary)
    manifest: Mapped[bytes] = mapped_column(LargeBinary)


class RecoveryPoint(Base):
    """An immutable point; rows exist only once every disk is complete and verified."""

    __tablename__ = "recovery_points"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    protection_id: Mapped[int] = mapped_column(ForeignKey("protections.id"), index=True)
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"))
    created_at: Mapped[datetime] = mapped_column()
    committed_at: Mapped[datetime] = mapped_column(default=utcnow)
    consistency: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16), default="visible")
    ref: Mapped[dict[str, Any]] = mapped_column(JSON)
    notes: Mapped[str] = mapped_column(Text, default="")
    protection: Mapped[Protection] = relationship(back_populates="points")
    disks: Mapped[list[PointDisk]] = relationship(order_by="PointDisk.disk")


class PointDisk(Base):
    """One disk of a recovery point with its per-block checksum manifest."""

    __tablename__ = "point_disks"
    point_id: Mapped[int] = mapped_column(ForeignKey("recovery_points.id"), primary_key=True)
    disk: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    block_size: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    digest: Mapped[str] = mapped_column(String(64))


class ChangeToken(Base):
    """The source's change token per disk, valid relative to the protection's latest point."""

    __tablename__ = "change_tokens"
    protection_id: Mapped[int] = mapped_column(ForeignKey("protections.id"), primary_key=True)
    disk: Mapped[str] = mapped_column(String(64), primary_key=True)
    token: Mapped[str | None] = mapped_column(String(256), nullable=True)
    point_id: Mapped[int] = mapped_column(Integer)


class Failover(Base):
    """A failover run and what it created at the target."""

    __tablename__ = "failovers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    protection_id: Mapped[int] = mapped_column(ForeignKey("protections.id"), index=True)
    point_id: Mapped[int] = mapped_column(ForeignKey("recovery_points.id"))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="starting")
    vm_name: Mapped[str] = mapped_column(String(128), default="")
    ref: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    running_at: Mapped[datetime | None] = mapped_column(nullable=True)
    point_time: Mapped[datetime | None] = mapped_column(nullable=True)
    data_loss_seconds: Mapped[float | None] = mapped_column(nullable=True)
    run_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    committed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class PlanRun(Base):
    """One run of a recovery plan (or a drill): a persisted state machine of steps."""

    __tablename__ = "plan_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    plan_name: Mapped[str] = mapped_column(String(128))
    plan_path: Mapped[str] = mapped_column(Text, default="")
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    steps: Mapped[list[RunStep]] = relationship(order_by="RunStep.seq")


class RunStep(Base):
    """One step of a plan run; finished steps are never repeated on resume."""

    __tablename__ = "run_steps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("plan_runs.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    group_name: Mapped[str] = mapped_column(String(64), default="")
    vm: Mapped[str] = mapped_column(String(128), default="")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    output: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Event(Base):
    """What happened, for `status` and audits."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    level: Mapped[str] = mapped_column(String(8), default="info")
    protection_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_HEAD = "0002"
"""The newest Alembic revision; a database already there skips Alembic (0.4 s) on open."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (Alembic loads only when needed)."""
    with engine.connect() as conn:
        try:
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except OperationalError:
            current = None
    if current == SCHEMA_HEAD:
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class State:
    """Handle on the state database: sessions, and the small queries everyone needs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate(self.engine)

    @classmethod
    def at(cls, directory: Path) -> State:
        directory.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{directory / 'state.db'}")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error."""
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    def protection(self, s: Session, key: str) -> Protection:
        """A protection by VM name, VM id or numeric id."""
        stmt = select(Protection).where((Protection.vm_name == key) | (Protection.vm_id == key))
        found = s.scalars(stmt).first()
        if found is None and key.isdigit():
            found = s.get(Protection, int(key))
        if found is None:
            raise NotFound(f"VM '{key}' is not protected (see `standby status`)")
        return found

    def log(
        self,
        s: Session,
        kind: str,
        message: str,
        protection_id: int | None = None,
        level: str = "info",
        **data: Any,
    ) -> None:
        s.add(
            Event(
                kind=kind,
                message=message,
                protection_id=protection_id,
                level=level,
                data=json.loads(json.dumps(data, default=str)),
            )
        )

    def dispose(self) -> None:
        self.engine.dispose()
