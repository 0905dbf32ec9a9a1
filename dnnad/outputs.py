"""The output transaction: a run's outputs on any pyarrow filesystem, under one rule:

**dnnad deletes or replaces only what it can prove it wrote.** A finished run is proved by its record
(``run.json``, or ``runs/DATE.json`` for audits) carrying dnnad's format marker and the list of outputs it
wrote; ``--overwrite`` replaces exactly those. A run in progress is proved by its owner file (host, pid,
start time and the outputs it writes): a live run's outputs are never touched (a second run into the same
``OUT`` is refused), a dead run's are cleaned. Anything else in the way stops the job with a one-line error
before any work starts.

The record is written last, so its presence means "finished". On a local disk outputs are staged in
``OUT/.staging-*`` and committed by rename; on an object store (no atomic rename) they are written in place
under the owner file and the record is the commit marker. Either way a killed run of the same configuration
is resumed from the partitions it committed.
"""
from __future__ import annotations

import io
import os
import socket
import time
import uuid
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage
from .config import ConfigError

RUN_FORMAT = "dnnad-run"
RUN_FORMAT_VERSION = 1
RUN_RECORD = "run.json"
STAGING_PREFIX = ".staging-"
OWNER_FILE = "owner.json"
IN_PROGRESS = ".dnnad-in-progress.json"  # object stores: the owner file of a run writing in place
LEGACY_OUTPUTS = ("scores", "model", "report.html", "ranking", "kept", "dropped")


def read_record(fs, path: str) -> dict | None:
    """A run record dnnad wrote at ``path``, or None (absent, unreadable, or not dnnad's)."""
    doc = storage.read_json(fs, path)
    if doc is not None and (doc.get("format") == RUN_FORMAT or ("dnnad_version" in doc and "kind" in doc)):
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


def _proc_start(pid: int) -> str | None:
    """The process's start time (Linux), so a recycled pid is not taken for the owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_alive(owner: dict) -> bool:
    """Whether the run that wrote an owner file may still be running (another host's: assume so)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    return isinstance(pid, int) and _pid_alive(pid) and _proc_start(pid) == owner.get("proc_start")


def new_owner(names: list[str]) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "outputs": names}


class OutDir:
    """The output location of one run (path or URI) and the names (relative paths) the run will write."""

    def __init__(self, out: str, names: list[str], overwrite: bool, record: str = RUN_RECORD,
                 fingerprint: str | None = None):
        self.out, self.names, self.overwrite, self.record = out, list(names), overwrite, record
        self.fingerprint = fingerprint  # a killed run's staging with the same fingerprint is resumed
        self.fs, self.path = storage.resolve(out)
        self.local = storage.is_local(self.fs)
        self.own_owner: str | None = None  # our own owner file, once the run started

    def at(self, name: str) -> str:
        return storage.join(self.path, name)

    def owners(self) -> list[tuple[str, dict]]:
        """(owner file, its content) of every run in progress or killed in this output location."""
        found = []
        for name in storage.listdir(self.fs, self.path):
            f = self.at(f"{name}/{OWNER_FILE}") if name.startswith(STAGING_PREFIX) else (
                self.at(name) if name == IN_PROGRESS else None)
            doc = storage.read_json(self.fs, f) if f and f != self.own_owner else None
            if doc is not None:
                found.append((f, doc))
        return found

    def check(self) -> None:
        """Before any work: refuse anything in the way that dnnad cannot prove it wrote."""
        out, t = self.out, storage.kind(self.fs, self.path)
        if t == pafs.FileType.NotFound:
            return
        if t != pafs.FileType.Directory:
            raise ConfigError(f"--out {out} exists and is not a directory")
        dead = set()
        for _, owner in self.owners():
            if owner_alive(owner):
                raise ConfigError(f"--out {out} is being written by another dnnad run (pid {owner.get('pid')} on "
                                  f"{owner.get('host')}, started {owner.get('started')}); wait for it or pick a new --out")
            dead.update(owner.get("outputs", ()))
        record_path = self.at(self.record)
        old = read_record(self.fs, record_path)
        if storage.exists(self.fs, record_path) and old is None:
            raise ConfigError(f"--out {out}: {self.record} exists but was not written by dnnad; pick a new --out")
        if old is not None and not self.overwrite:
            raise ConfigError(f"--out {out} already holds a finished run ({self.record}); "
                              f"pass --overwrite or pick a new --out")
        ours = set(old.get("written", LEGACY_OUTPUTS if "format" not in old else ())) if old else set()
        if self.own_owner is not None and not self.local:
            ours |= set(self.names)  # written in place by this very run (commit-time check)
        for name in self.names:
            if storage.exists(self.fs, self.at(name)) and name not in ours | dead:
                raise ConfigError(f"--out {out} holds {name!r}, which no finished dnnad run there wrote; "
                                  f"dnnad will not replace it: pick a new --out")

    def open(self) -> Staging:
        self.check()
        resume = None
        for f, owner in self.owners():  # a killed run's leftovers, proved dnnad's by their owner file
            same_run = bool(self.fingerprint) and owner.get("fingerprint") == self.fingerprint \
                and owner.get("outputs") == self.names  # same configuration and outputs (an audit's date)
            if f.endswith(OWNER_FILE):
                if resume is None and same_run:
                    resume = f.rsplit("/", 1)[0]  # the same run, killed: continue from what it committed
                    continue
                storage.delete(self.fs, f.rsplit("/", 1)[0])
            else:
                if resume is None and same_run:
                    resume = self.path  # written in place: continue from the partitions it committed
                    continue
                for name in owner.get("outputs", ()):
                    if name not in self.names:
                        storage.delete(self.fs, self.at(name))
                storage.delete(self.fs, f)
        return Staging(self, resume)


def _committed_work(fs, path: str) -> bool:
    """An output a killed run can be resumed from: a partitioned output with commit markers. Everything else
    (a model, a report) is written again."""
    return any(n.startswith(".part-") and n.endswith(".done") for n in storage.listdir(fs, path))


class Staging:
    """Where a run's outputs are written before its record commits them. ``resumed`` is the staging
    directory of a killed run of the same configuration, adopted with the partitions it committed."""

    def __init__(self, target: OutDir, resume: str | None = None):
        self.target, self.fs, self.resumed = target, target.fs, resume is not None
        if target.local:
            self.dir = resume or target.at(f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
            target.own_owner = storage.join(self.dir, OWNER_FILE)
        else:  # no rename on object stores: write in place, owned by the in-progress file
            self.dir = target.path
            target.own_owner = target.at(IN_PROGRESS)
            old = read_record(self.fs, target.at(target.record))
            for name in target.names:  # replaced outputs of a finished run (--overwrite), or a dead run's
                if self.resumed and _committed_work(self.fs, target.at(name)):
                    continue  # the killed run's committed partitions
                if storage.exists(self.fs, target.at(name)):
                    if old is not None:
                        storage.delete(self.fs, target.at(target.record))  # no longer "finished"
                        old = None
                    storage.delete(self.fs, target.at(name))
        storage.write_json(self.fs, target.own_owner, {**new_owner(target.names), "fingerprint": target.fingerprint})

    def path(self, name: str) -> str:
        """Path (inside ``fs``) where output ``name`` (declared to ``OutDir``) is written before the commit."""
        if name not in self.target.names:
            raise ValueError(f"output {name!r} was not declared")
        return storage.join(self.dir, name)

    def uri(self, name: str) -> str:
        """The same place as a URI (for writers that take one, such as ``save_model``)."""
        return storage.child_uri(self.target.out, self.path(name)) if not self.target.local else self.path(name)

    def partitions(self, name: str) -> Partitions:
        return Partitions(self.fs, self.path(name))

    def write_table(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(self.fs, storage.join(self.path(name), "part-00000.parquet"), buf.getvalue())

    def write_tables(self, name: str, schema: pa.Schema, tables: Iterable[pa.Table]) -> None:
        """Write ``tables`` one after another into one Parquet file of output ``name``, streamed: only the
        table being written is in memory."""
        def write(f):
            with pq.ParquetWriter(f, schema) as w:
                for t in tables:
                    w.write_table(t)

        storage.write_with(self.fs, storage.join(self.path(name), "part-00000.parquet"), write)

    def write_text(self, name: str, text: str) -> None:
        storage.write_bytes(self.fs, self.path(name), text.encode())

    def commit(self, record: dict) -> None:
        """Move every written output into place, replacing only a finished dnnad run's; record last."""
        t = self.target
        t.check()  # nothing appeared in the way while the run worked
        written = [n for n in t.names if storage.exists(self.fs, self.path(n))]
        record = {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, **record, "written": written}
        record_path = t.at(t.record)
        if t.local:
            if os.path.lexists(record_path):
                os.remove(record_path)  # an --overwrite: the old run stops being "finished" first
            trash = os.path.join(self.dir, ".replaced")
            for name in written:
                final = t.at(name)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                if os.path.lexists(final):
                    os.makedirs(os.path.dirname(os.path.join(trash, name)), exist_ok=True)
                    os.replace(final, os.path.join(trash, name))
                os.replace(self.path(name), final)
        storage.write_json(self.fs, record_path + ".tmp" if t.local else record_path, record)
        if t.local:
            os.replace(record_path + ".tmp", record_path)
            storage.delete(self.fs, self.dir)
        else:
            storage.delete(self.fs, t.own_owner)

    def abort(self) -> None:
        """Remove what this run wrote (it never finished); other files are untouched."""
        t = self.target
        if t.local:
            storage.delete(self.fs, self.dir)
            return
        for name in t.names:
            storage.delete(self.fs, self.path(name))
        storage.delete(self.fs, t.own_owner)


class Partitions:
    """Per-partition commit markers inside one staged output: a killed run resumes from the partitions it
    finished; a partition without its marker is written again from scratch (never twice, never half)."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def done(self, i: int) -> bool:
        return storage.exists(self.fs, storage.join(self.path, f".part-{i:05d}.done"))

    def start(self, i: int) -> str:
        """The file-name prefix partition ``i`` writes under, its earlier partial files removed."""
        prefix = f"p{i:05d}"
        for name in storage.listdir(self.fs, self.path):
            if name.startswith(prefix + "_"):
                storage.delete(self.fs, storage.join(self.path, name))
        return prefix

    def finish(self, i: int) -> None:
        storage.write_bytes(self.fs, storage.join(self.path, f".part-{i:05d}.done"), b"")

    def clear_markers(self) -> None:
        for name in storage.listdir(self.fs, self.path):
            if name.startswith(".part-"):
                storage.delete(self.fs, storage.join(self.path, name))


def status_counts(fs, path: str) -> dict:
    """Rows per status of a written table, streaming only its status column."""
    total: dict[str, int] = {}
    for batch in pads.dataset(path, format="parquet", filesystem=fs).to_batches(columns=["status"],
                                                                                batch_size=65_536):
        for c in pc.value_counts(batch.column(0)).to_pylist():
            total[c["values"]] = total.get(c["values"], 0) + c["counts"]
    return dict(sorted(total.items()))


def output_path(out: str, name: str) -> str:
    """Where output ``name`` of a run into ``out`` lands (a path or a URI, credentials removed), for the record."""
    if "://" not in out:
        return os.path.join(out, name)
    base, sep, query = out.partition("?")
    return storage.redact(base.rstrip("/") + "/" + name + sep + query)
