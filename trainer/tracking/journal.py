"""The tracking journal of a run directory: every MLflow record, written before it is sent.

``RUN_DIR/mlflow-journal/journal.jsonl`` holds one JSON object per line, appended and flushed
(to the operating system, so a killed process loses nothing; ``close`` also fsyncs):

- ``{"session": {...}}``: a process opened the journal (tracking URI, experiment, offline, pid);
- ``{"seq": N, "op": ..., ...}``: a record (``create_run``, ``reopen_run``, ``log_params``,
  ``log_metrics``, ``set_tags``, ``log_artifact``, ``log_inputs``, ``log_model``,
  ``register_model``, ``set_terminated``) with everything needed to send it again: metric
  timestamps, run start and end times, artifact paths, the dataset inputs' fields, the folder of a
  saved MLflow model (``RUN_DIR/mlflow-models/<stage>``, written once, so not spooled);
- ``{"done": N}``: record N was delivered (``"run_id"`` for a ``create_run``: the MLflow id of the
  placeholder ``local-...`` id handed out while the server was away);
- ``{"spool": N, "path": ...}``: record N's artifact was copied under ``mlflow-journal/spool/`` when
  it could not be sent at once, so later changes to the file cannot alter what gets delivered (the
  copy is removed once delivered).

A record without a ``done`` line is pending. A torn last line (a process killed mid-write) is
skipped: that record's delivery had not been attempted yet.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

JOURNAL_DIR = "mlflow-journal"
JOURNAL_FILE = "journal.jsonl"


class JournalBusy(RuntimeError):
    """Another process (a training still running) holds the journal."""


class Journal:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / JOURNAL_DIR
        self.path = self.directory / JOURNAL_FILE
        self.records: dict[int, dict[str, Any]] = {}
        self.done: set[int] = set()
        self._pending: dict[int, dict[str, Any]] = {}  # in sequence order
        self._last_seq = 0
        self.run_ids: dict[str, str] = {}      # placeholder -> MLflow run id
        self.spooled: dict[int, str] = {}
        self.discarded: set[int] = set()
        self.sessions: list[dict[str, Any]] = []
        self._handle = None
        self._lock = None
        self._load()

    @staticmethod
    def exists(run_dir: Path) -> bool:
        return (Path(run_dir) / JOURNAL_DIR / JOURNAL_FILE).is_file()

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        if not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line: the process died while writing it
            self._apply(entry)

    def _apply(self, entry: dict[str, Any]) -> None:
        if "seq" in entry:
            self.records[entry["seq"]] = entry
            self._pending[entry["seq"]] = entry
            self._last_seq = max(self._last_seq, entry["seq"])
        elif "done" in entry:
            self.done.add(entry["done"])
            self._pending.pop(entry["done"], None)
            record = self.records.get(entry["done"])
            if entry.get("run_id") and record is not None and record["op"] == "create_run":
                self.run_ids[record["local_id"]] = entry["run_id"]
        elif "discarded" in entry:  # given up on by the user (replay --discard)
            self.discarded.add(entry["discarded"])
            self._pending.pop(entry["discarded"], None)
        elif "spool" in entry:
            self.spooled[entry["spool"]] = entry["path"]
        elif "session" in entry:
            self.sessions.append(entry["session"])

    def pending(self) -> list[dict[str, Any]]:
        return list(self._pending.values())

    def is_pending(self, record: dict[str, Any]) -> bool:
        return record["seq"] in self._pending

    def last_session(self) -> dict[str, Any] | None:
        return self.sessions[-1] if self.sessions else None

    # ------------------------------------------------------------------ writing
    def open(self, session: dict[str, Any]) -> None:
        """Takes the journal's lock (for this process's lifetime) and starts a session."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.directory / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            raise JournalBusy(f"{self.path} is in use by {holder}") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}\n")
        self._lock.flush()
        self._handle = open(self.path, "a")
        if self._handle.tell() > 0:  # a torn last line must not swallow the next entry
            with open(self.path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    self._handle.write("\n")
        self._write({"session": {**session, "pid": os.getpid(),
                                 "opened": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})

    def _write(self, entry: dict[str, Any]) -> None:
        self._handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._handle.flush()
        self._apply(entry)

    def add(self, op: str, **fields: Any) -> dict[str, Any]:
        record = {"seq": self._last_seq + 1, "op": op, **fields}
        self._write(record)
        return record

    def mark_done(self, record: dict[str, Any], run_id: str | None = None) -> None:
        entry = {"done": record["seq"]}
        if run_id is not None:
            entry["run_id"] = run_id
        self._write(entry)
        if record["seq"] in self.spooled:  # delivered: the copy is no longer needed
            # the folder is computed, never read from the journal (which could be crafted)
            shutil.rmtree(self.directory / "spool" / str(int(record["seq"])), ignore_errors=True)

    def discard(self, seq: int) -> dict[str, Any]:
        """Gives up on pending record ``seq`` (a record the store rejects would otherwise block
        every later one); the journal keeps it, marked, for the record."""
        record = self._pending.get(seq)
        if record is None:
            raise KeyError(f"record {seq} is not pending")
        self._write({"discarded": seq})
        return record

    def artifact_source(self, record: dict[str, Any]) -> Path:
        """The file a ``log_artifact`` record uploads: its spooled copy, else the logged path.
        Either must lie inside the run directory: a crafted journal cannot make a replay upload
        any other file."""
        spooled = self.spooled.get(record.get("seq"))
        path = Path(spooled if spooled is not None else record["path"]).resolve()
        run_dir = self.run_dir.resolve()
        if not path.is_relative_to(run_dir):
            raise ValueError(f"record {record.get('seq')}: refusing to upload {path}: outside "
                             f"the run directory {run_dir}")
        return path

    def model_source(self, record: dict[str, Any]) -> Path:
        """The saved MLflow model folder a ``log_model`` record uploads; like an artifact, it must
        lie inside the run directory."""
        path = Path(record["path"]).resolve()
        run_dir = self.run_dir.resolve()
        if not path.is_relative_to(run_dir):
            raise ValueError(f"record {record.get('seq')}: refusing to upload {path}: outside "
                             f"the run directory {run_dir}")
        return path

    def spool(self, record: dict[str, Any]) -> None:
        """Copies a pending artifact into the journal (once), so what is delivered later is the
        file as it was when logged."""
        if record["seq"] in self.spooled or not Path(record["path"]).is_file():
            return
        target = self.directory / "spool" / str(record["seq"]) / Path(record["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(record["path"], target)
        self._write({"spool": record["seq"], "path": str(target)})

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
