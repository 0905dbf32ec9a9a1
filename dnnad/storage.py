"""Paths and URIs on any pyarrow filesystem (local, file://, s3://, gs://): the few operations outputs and
models need. Local paths keep atomic renames; object stores get direct writes with a marker written last."""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
import urllib.parse

import pyarrow as pa
import pyarrow.fs as pafs

SECRET_OPTION = re.compile(r"key|secret|token|password|credential|signature", re.IGNORECASE)


class StorageError(ValueError):
    """A location that cannot be used; the message is one line, credentials removed."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a pyarrow URI (``s3://bucket/key?endpoint_override=...``).

    A URI with a scheme is an object-store location or a ``StorageError``, never a local path: an option or a
    scheme pyarrow does not take must not send a run's outputs to the driver's disk."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise StorageError(f"{redact(uri)} is not a usable URI: {scrub(str(e).splitlines()[0], secrets(uri))}") from None


def secrets(uri: str) -> list[str]:
    """The credentials a URI carries: its user info (``s3://KEY:SECRET@bucket``) and the values of options
    named like keys, secrets, tokens or passwords, each as written and decoded."""
    if "://" not in uri:
        return []
    parts = urllib.parse.urlsplit(uri)
    raw = [v for v in (parts.username, parts.password) if v]
    raw += [kv.partition("=")[2] for kv in parts.query.split("&") if SECRET_OPTION.search(kv.partition("=")[0])]
    found = {v for r in raw for v in (r, urllib.parse.unquote(r), urllib.parse.unquote_plus(r)) if v}
    return sorted(found, key=len, reverse=True)


def redact(uri: str | None) -> str | None:
    """``uri`` as it may be recorded or shown: user info and secret option values replaced by ``***``."""
    if uri is None or "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    netloc = f"***@{netloc}" if "@" in parts.netloc else netloc
    query = "&".join(f"{kv.partition('=')[0]}=***" if SECRET_OPTION.search(kv.partition("=")[0]) else kv
                     for kv in parts.query.split("&") if kv)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, secret_values: list[str]) -> str:
    """``text`` with every given secret replaced by ``***`` (error messages may quote a URI or an option)."""
    for v in secret_values:
        text = text.replace(v, "***")
    return text


def child_uri(base_uri: str, path: str) -> str:
    """A URI for ``path`` on the filesystem of ``base_uri`` (its scheme and query options kept)."""
    if "://" not in base_uri:
        return path
    scheme, rest = base_uri.split("://", 1)
    query = rest.split("?", 1)[1] if "?" in rest else ""
    return f"{scheme}://{path}" + (f"?{query}" if query else "")


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def kind(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return kind(fs, path) != pafs.FileType.NotFound


def is_empty_dir(fs: pafs.FileSystem, path: str) -> bool:
    return not fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def listdir(fs: pafs.FileSystem, path: str) -> list[str]:
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    write_with(fs, path, lambda f: f.write(data))


def write_with(fs: pafs.FileSystem, path: str, write) -> None:
    """Create ``path`` and let ``write(file)`` stream its content (no whole copy of it in memory)."""
    parent = posixpath.dirname(path)
    try:
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as f:
            write(f)
    except OSError as e:  # name the file: a full disk or a refused write is one line saying where
        raise OSError(e.errno, os.strerror(e.errno) if e.errno else e.strerror or str(e).splitlines()[0], path) from None


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(fs: pafs.FileSystem, path: str, doc: dict) -> None:
    write_bytes(fs, path, json.dumps(doc, indent=2, default=str).encode())


def read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    """The JSON object at ``path``, or None when it is absent or not a JSON object."""
    try:
        doc = json.loads(read_bytes(fs, path))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def load_npy(fs: pafs.FileSystem, path: str):
    import numpy as np

    return np.load(io.BytesIO(read_bytes(fs, path)), allow_pickle=False)


def delete(fs: pafs.FileSystem, path: str) -> None:
    """Remove a file or a directory tree (callers prove it is dnnad's first)."""
    t = kind(fs, path)
    if t == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif t == pafs.FileType.File:
        fs.delete_file(path)
