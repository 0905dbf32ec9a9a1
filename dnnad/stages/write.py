"""Write stage: Parquet outputs staged inside ``OUT`` and committed by rename, under one rule:

**dnnad deletes or replaces only what it can prove it wrote.** A finished run is proved by its record
(``run.json``, or ``runs/DATE.json`` for audits) carrying dnnad's format marker and the list of outputs it
wrote; ``--overwrite`` replaces exactly those. A staging directory carries its owner (host, pid, start
time): a live run's staging is never touched (a second run into the same ``OUT`` is refused), a dead
run's is cleaned. Anything else in the way stops the job with a one-line error before any work starts.

A reader never sees a half-written result: the record is written last, so its presence means "finished".
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import ConfigError

RUN_FORMAT = "dnnad-run"
RUN_FORMAT_VERSION = 1
RUN_RECORD = "run.json"
STAGING_PREFIX = ".staging-"
OWNER_FILE = "owner.json"
LEGACY_OUTPUTS = ("scores", "model", "report.html", "ranking", "kept", "dropped")


def read_record(path: str) -> dict | None:
    """A run record dnnad wrote at ``path``, or None (absent, unreadable, or not dnnad's)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    if doc.get("format") == RUN_FORMAT or ("dnnad_version" in doc and "kind" in doc):
        return doc
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_alive(owner: dict) -> bool:
    """Whether the run that owns a staging directory may still be running."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine's run: never assume it is dead
    pid = owner.get("pid")
    return isinstance(pid, int) and _pid_alive(pid) and _proc_start(pid) == owner.get("proc_start")


def _proc_start(pid: int) -> str | None:
    """The process's start time (Linux), so a recycled pid is not taken for the owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class OutDir:
    """The output directory of one run and the names (relative paths) the run will write in it."""

    def __init__(self, out: str, names: list[str], overwrite: bool, record: str = RUN_RECORD):
        self.out, self.names, self.overwrite, self.record = out, list(names), overwrite, record
        self.own_staging: str | None = None

    def check(self) -> None:
        """Before any work: refuse anything in the way that a finished dnnad run did not write."""
        out = self.out
        if os.path.lexists(out) and not os.path.isdir(out):
            raise ConfigError(f"--out {out} exists and is not a directory")
        if not os.path.isdir(out):
            return
        for owner in self._stagings(alive=True):
            raise ConfigError(f"--out {out} is being written by another dnnad run (pid {owner.get('pid')} on "
                              f"{owner.get('host')}, started {owner.get('started')}); wait for it or pick a new --out")
        record_path = os.path.join(out, self.record)
        old = read_record(record_path)
        if os.path.lexists(record_path) and old is None:
            raise ConfigError(f"--out {out}: {self.record} exists but was not written by dnnad; "
                              f"pick a new --out")
        if old is not None and not self.overwrite:
            raise ConfigError(f"--out {out} already holds a finished run ({self.record}); "
                              f"pass --overwrite or pick a new --out")
        ours = set(old.get("written", LEGACY_OUTPUTS if "format" not in old else ())) if old else set()
        for name in self.names:
            if os.path.lexists(os.path.join(out, name)) and name not in ours:
                raise ConfigError(f"--out {out} holds {name!r}, which no finished dnnad run there wrote; "
                                  f"dnnad will not replace it: pick a new --out")

    def _stagings(self, alive: bool) -> list[dict]:
        found = []
        for name in os.listdir(self.out):
            path = os.path.join(self.out, name)
            if not name.startswith(STAGING_PREFIX) or not os.path.isdir(path) or path == self.own_staging:
                continue
            try:
                with open(os.path.join(path, OWNER_FILE)) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                continue  # no owner file: not provably ours, left alone
            if _owner_alive(owner) == alive:
                found.append({**owner, "path": path})
        return found

    def open(self) -> Staging:
        self.check()
        os.makedirs(self.out, exist_ok=True)
        for dead in self._stagings(alive=False):  # a killed run's staging, proved ours by its owner file
            shutil.rmtree(dead["path"], ignore_errors=True)
        return Staging(self)


class Staging:
    """A staging directory inside ``OUT`` whose outputs are moved into place by ``commit``."""

    def __init__(self, target: OutDir):
        self.target = target
        self.dir = os.path.join(target.out, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
        os.makedirs(self.dir)
        target.own_staging = self.dir
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(os.path.join(self.dir, OWNER_FILE), "w") as f:
            json.dump(owner, f)

    def path(self, name: str) -> str:
        """Where output ``name`` (one of the names declared to ``OutDir``) is written before the commit."""
        if name not in self.target.names:
            raise ValueError(f"output {name!r} was not declared")
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def write_table(self, name: str, table: pa.Table) -> None:
        os.makedirs(self.path(name), exist_ok=True)
        pq.write_table(table, os.path.join(self.dir, name, "part-00000.parquet"))

    def write_text(self, name: str, text: str) -> None:
        with open(self.path(name), "w") as f:
            f.write(text)

    def commit(self, record: dict) -> None:
        """Move every written output into place, replacing only a finished dnnad run's; record last."""
        t = self.target
        t.check()  # nothing appeared in the way while the run worked
        record = {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, **record,
                  "written": [n for n in t.names if os.path.lexists(os.path.join(self.dir, n))]}
        record_path = os.path.join(t.out, t.record)
        if os.path.lexists(record_path):
            os.remove(record_path)  # an --overwrite: the old run stops being "finished" first
        trash = os.path.join(self.dir, ".replaced")
        for name in record["written"]:
            final = os.path.join(t.out, name)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            if os.path.lexists(final):
                os.makedirs(os.path.dirname(os.path.join(trash, name)), exist_ok=True)
                os.replace(final, os.path.join(trash, name))
            os.replace(os.path.join(self.dir, name), final)
        os.makedirs(os.path.dirname(record_path), exist_ok=True)
        tmp = os.path.join(self.dir, "record.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, default=str)
        os.replace(tmp, record_path)
        shutil.rmtree(self.dir, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
