"""Exit records: why a rank or an engine ended, as a JSON document in a file its parent names.

A parent learns why a child died from this record, never from its log text (the log keeps the
human-readable story). A rank writes its own record when it fails with an exception; the parent
writes one for a child that died without a word (a signal, `os._exit`), from its exit status. An
engine's record carries its ranks' records as `causes`, and `root_cause` picks the earliest failure:
when rank 1 dies and rank 0 then times out in a collective, rank 1's death is the story.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tpfleet import env, phases


@dataclass
class ExitRecord:
    role: str  # "rank" or "engine"
    rank: int | None
    pid: int
    phase: str  # the start-up phase reached (tpfleet.phases), or "serving"
    exc_type: str | None = None
    message: str = ""
    traceback: str | None = None
    exitcode: int | None = None  # >= 0: exit code; < 0: killed by signal -exitcode
    time: float = field(default_factory=time.time)
    causes: list[ExitRecord] = field(default_factory=list)

    @property
    def signal(self) -> str | None:
        if self.exitcode is None or self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.role == "rank" else "engine"
        if self.exc_type:
            how = f"{self.exc_type}: {self.message}"
        elif self.signal:
            how = f"killed by {self.signal}"
        else:
            how = f"exit code {self.exitcode}" + (f": {self.message}" if self.message else "")
        return f"{who} (pid {self.pid}) in phase {self.phase}: {how}"

    def to_dict(self) -> dict:
        return {**asdict(self), "signal": self.signal}

    @classmethod
    def from_dict(cls, d: dict) -> ExitRecord:
        causes = [cls.from_dict(c) for c in d.get("causes", [])]
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "causes"}
        return cls(**known, causes=causes)

    @classmethod
    def from_exception(cls, exc: BaseException, role: str, rank: int | None, phase: str) -> ExitRecord:
        return cls(role, rank, os.getpid(), phase, type(exc).__name__, str(exc).strip()[:4000],
                   "".join(traceback.format_exception(exc)))

    @classmethod
    def from_exit(cls, role: str, rank: int | None, pid: int, exitcode: int | None, phase: str,
                  message: str = "") -> ExitRecord:
        """For a child that died without writing its own record."""
        return cls(role, rank, pid, phase, exitcode=exitcode, message=message)


def write(path: str | Path, record: ExitRecord) -> None:
    """Atomically: a reader sees the whole record or none. The first record written wins, because the
    first failure is the cause and later ones are its consequences."""
    path = Path(path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.to_dict()))
    os.replace(tmp, path)


def read(path: str | Path) -> ExitRecord | None:
    try:
        return ExitRecord.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def rank_path(engine_path: str | Path, rank: int) -> Path:
    """Where rank `rank` of the engine whose record goes to `engine_path` writes its own."""
    engine_path = Path(engine_path)
    return engine_path.with_name(f"{engine_path.name}.rank{rank}")


def root_cause(records: list[ExitRecord]) -> ExitRecord | None:
    """The earliest failure among `records` and their causes."""
    flat: list[ExitRecord] = []

    def walk(r: ExitRecord) -> None:
        flat.append(r)
        for c in r.causes:
            walk(c)

    for r in records:
        walk(r)
    failed = [r for r in flat if r.exc_type or (r.exitcode not in (None, 0))]
    return min(failed, key=lambda r: r.time) if failed else None


def write_engine_record(path: str | Path | None, tp_size: int, record: ExitRecord) -> None:
    """Write the engine's record with whatever its ranks wrote attached as causes. No-op without a path
    (an engine started by hand, not by a launcher)."""
    if path is None:
        return
    record.causes = [r for r in (read(rank_path(path, rank)) for rank in range(tp_size)) if r is not None]
    write(path, record)


def rank_records(engine_path: str | Path) -> list[ExitRecord]:
    """Every record the ranks of the engine whose record goes to `engine_path` have written so far."""
    engine_path = Path(engine_path)
    found = (read(p) for p in sorted(engine_path.parent.glob(f"{engine_path.name}.rank*")))
    return sorted((r for r in found if r is not None), key=lambda r: (r.rank is None, r.rank))


def present(engine_path: str | Path) -> bool:
    """Whether the engine or any of its ranks has written a record: it has failed or is failing."""
    engine_path = Path(engine_path)
    return engine_path.exists() or any(engine_path.parent.glob(f"{engine_path.name}.rank*"))


def clear(engine_path: str | Path) -> None:
    """Remove the records of an earlier run at this path, so a record found later is this run's."""
    engine_path = Path(engine_path)
    for stale in [engine_path, *engine_path.parent.glob(f"{engine_path.name}.rank*")]:
        stale.unlink(missing_ok=True)


def ends_the_process(exc: BaseException) -> bool:
    """A failure, not a requested stop (Ctrl-C, SIGTERM turned into one, a clean exit)."""
    if isinstance(exc, KeyboardInterrupt):
        return False
    return not (isinstance(exc, SystemExit) and exc.code in (0, None))


def record_engine_failure(exc: BaseException, tp_size: int) -> None:
    """The engine's exit record for `exc`, at the path its launcher named (no-op without one), unless
    `exc` is a requested stop."""
    if ends_the_process(exc):
        write_engine_record(env.exit_record_path(), tp_size,
                            ExitRecord.from_exception(exc, "engine", 0, phases.current_phase()))
