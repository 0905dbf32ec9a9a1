"""Output directory handling: refuse to clobber another run, stage everything, commit by rename.

A reader never sees a half-written result: tables are written under ``OUT/.staging-*`` and moved
to their final names only after every table of the run is complete; ``run.json`` is written last.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from .config import ConfigError

RUN_RECORD = "run.json"


def check_out_dir(out: str, overwrite: bool, record: str = RUN_RECORD) -> None:
    """Before any work: an output directory holding a finished run needs ``--overwrite``."""
    if os.path.exists(os.path.join(out, record)) and not overwrite:
        raise ConfigError(f"{out} already holds a finished run ({record}); pass --overwrite or pick a new --out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} exists and is not a directory")


class Staging:
    """A staging directory inside ``out`` whose tables are moved into place by ``commit``."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        for old in os.listdir(out):  # leftovers of a killed run: never visible results, safe to drop
            if old.startswith(".staging-"):
                shutil.rmtree(os.path.join(out, old), ignore_errors=True)
        self.out = out
        self.dir = tempfile.mkdtemp(prefix=".staging-", dir=out)
        self.names: list[str] = []

    def path(self, name: str) -> str:
        self.names.append(name)
        return os.path.join(self.dir, name)

    def write_table(self, name: str, table: pa.Table) -> None:
        os.makedirs(self.path(name), exist_ok=True)
        pq.write_table(table, os.path.join(self.dir, name, "part-00000.parquet"))

    def write_text(self, name: str, text: str) -> None:
        os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(text)

    def commit(self, record: dict, record_name: str = RUN_RECORD) -> None:
        old_record = os.path.join(self.out, record_name)
        if os.path.exists(old_record):
            os.remove(old_record)  # an --overwrite: the old run stops being "finished" first
        for name in self.names:
            final = os.path.join(self.out, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(os.path.join(self.dir, name), final)
        os.makedirs(os.path.dirname(old_record), exist_ok=True)
        tmp = os.path.join(self.dir, "record.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, default=str)
        os.replace(tmp, old_record)
        shutil.rmtree(self.dir, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
