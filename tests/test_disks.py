"""Files as real disks hold them and outputs as real disks and object stores take them: names that are not
UTF-8, photos turned by EXIF, a full disk, URIs that are wrong, credentials that must not leak, a night of
unreadable images, a quiet run. Every case runs through the CLI with real Ray, real files and a real S3."""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, unquote_plus

import numpy as np
import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dnnad.cli import main
from dnnad.sources import escape_name, list_images, unescape_name
from dnnad.storage import redact, resolve, scrub, secrets
from dnnad.vision.decode import decode_image
from tests.helpers import FAST, RESUMABLE, ROOT, cifar_rows, read_scores, write_folder

SECRET = "Zq8SECRETvalue/with+odd=chars"


@pytest.fixture(scope="module")
def normal_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("normal")
    write_folder(d, cifar_rows("train", 1, 30))
    return d


@pytest.mark.unit
def test_file_names_that_are_not_utf8_get_lossless_distinct_ids(tmp_path):
    root = os.fsencode(tmp_path)
    raw = [b"caf\xe9.png", b"caf\xc3\xa9.png", b"lit\\xe9.png", b"\xff\xfe.png", b"plain.png"]
    for name in raw:
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"x")
    t = list_images(resolve(str(tmp_path))[0], str(tmp_path))
    ids = t["id"].to_pylist()
    assert sorted(ids) == sorted(["caf\\xe9.png", "café.png", "lit\\\\xe9.png", "\\xff\\xfe.png", "plain.png"])
    assert sorted(os.fsencode(unescape_name(i)) for i in ids) == sorted(raw)  # every id names its file exactly
    assert [escape_name(unescape_name(i)) for i in ids] == ids


@pytest.mark.ray
def test_a_folder_with_non_utf8_names_is_scored_row_by_row(ray_local, normal_dir, tmp_path):
    query = tmp_path / "query"
    query.mkdir()
    jpeg = cifar_rows("test", None, 3)["image"].to_pylist()
    names = [b"photo-\xe9t\xe9.jpg", b"ok.jpg", b"broken-\xff.jpg"]
    for name, data in zip(names, [jpeg[0], jpeg[1], b"not an image"]):
        with open(os.path.join(os.fsencode(query), name), "wb") as f:
            f.write(data)
    assert main(["score", "--normal", str(normal_dir), "--query", str(query), "--out", str(tmp_path / "out"),
                 *FAST]) == 0
    rows = {r["id"]: r for r in read_scores(tmp_path / "out").to_pylist()}
    assert set(rows) == {"photo-\\xe9t\\xe9.jpg", "ok.jpg", "broken-\\xff.jpg"}
    assert rows["photo-\\xe9t\\xe9.jpg"]["status"] == "ok" and rows["ok.jpg"]["status"] == "ok"
    assert rows["broken-\\xff.jpg"]["status"] == "error" and "not an image" in rows["broken-\\xff.jpg"]["error"]


@pytest.mark.unit
def test_photos_are_decoded_as_a_viewer_shows_them():
    rng = np.random.default_rng(0)
    pixels = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    for orientation, shown in ((1, pixels), (3, np.rot90(pixels, 2)), (6, np.rot90(pixels, -1)),
                               (8, np.rot90(pixels, 1)), (2, pixels[:, ::-1])):
        img = Image.fromarray(pixels)
        exif = img.getexif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        img.save(buf, format="PNG", exif=exif.tobytes())
        np.testing.assert_array_equal(np.asarray(decode_image(buf.getvalue())), shown)
    turned = Image.fromarray(np.rot90(pixels, 1))  # a camera JPEG stored turned, with its orientation tag
    exif = turned.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    turned.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (30, 20)


@pytest.mark.unit
def test_a_uri_pyarrow_cannot_parse_is_a_one_line_error_never_a_local_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = {"--out": f"s3://bkt/run1?endpoint_override=127.0.0.1:1&scheme=http&access_key=AKIDX&secret_key={SECRET}",
           "--query": "s4://bucket/corpus", "--model": "s3://bkt/m?endpiont_override=127.0.0.1:1"}
    for flag, uri in bad.items():
        args = {"--normal": str(tmp_path), "--query": str(tmp_path), "--out": str(tmp_path / "o"), flag: uri}
        assert main(["score", *[x for kv in args.items() for x in kv], *FAST]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dnnad: error: {flag}: ") and "not a usable URI" in err and err.count("\n") == 1
        assert SECRET not in err and "AKIDX" not in err
    assert sorted(os.listdir(tmp_path)) == []  # nothing was written anywhere, least of all ./s3:/


@pytest.mark.unit
def test_recorded_locations_carry_no_credentials():
    uri = f"s3://AKIDX:{quote(SECRET, safe='')}@bkt/run?endpoint_override=h:1&scheme=http&session_token={SECRET}"
    assert redact(uri) == "s3://***@bkt/run?endpoint_override=h:1&scheme=http&session_token=***"
    assert redact("/plain/path") == "/plain/path" and redact("s3://bkt/a?region=x") == "s3://bkt/a?region=x"
    message = f"cannot open {uri}: {SECRET} / {quote(SECRET, safe='')} / {unquote_plus(SECRET)}"
    assert scrub(message, secrets(uri)) == "cannot open s3://***:***@bkt/run?endpoint_override=h:1&scheme=http" \
        "&session_token=***: *** / *** / ***"


@pytest.mark.ray
def test_no_byte_of_a_secret_reaches_outputs_report_or_logs(ray_local, s3, normal_dir, tmp_path):
    """User-info credentials (pyarrow's form) on --out: the run writes to S3, and neither its outputs, the
    model, the report, its console nor Ray's session logs hold the secret."""
    fs, opts = s3
    endpoint = opts.lstrip("?")
    secret = "testingSECRET"  # moto takes any key
    out = f"s3://testing:{secret}@bucket/leak-check?{endpoint}"
    short = Path(tempfile.mkdtemp(prefix="dnnad-", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": str(short / "ray"), "TMPDIR": str(short / "tmp")}
    (short / "tmp").mkdir()
    proc = subprocess.run([sys.executable, "jobs/score.py", "--normal", str(normal_dir), "--query", str(normal_dir),
                           "--out", out, *FAST[:-1]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert secret not in proc.stdout + proc.stderr and "bucket/leak-check" in proc.stdout
    written = [f for f in fs.get_file_info(pafs.FileSelector("bucket/leak-check", recursive=True))
               if f.type == pafs.FileType.File]  # every object the run wrote
    assert {"run.json", "report.html"} <= {Path(f.path).name for f in written} and len(written) > 5
    for f in written:
        with fs.open_input_stream(f.path) as s:
            assert secret.encode() not in s.read(), f.path
    try:
        logs = [p for d in (short / "ray", short / "tmp") for p in d.rglob("*") if p.is_file()]
        assert len(logs) > 5, "Ray wrote no session files where it was told to"
        for p in logs:
            assert secret.encode() not in p.read_bytes(), p
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.unit
def test_collected_rows_need_room_in_tmpdir_and_say_so_when_it_is_full(tmp_path, monkeypatch):
    """The driver's disk arrays reserve their space when made: a full TMPDIR is a clear OSError then, never a
    SIGBUS when a mapped page is first written."""
    from dnnad.core.arrays import disk_array, on_disk

    disk = tmp_path / "tmp"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(disk))
        small = disk_array((100, 128), np.float32)  # 50 KiB
        small[:] = 1.0
        assert on_disk(small) and float(small.sum()) == 100 * 128
        with pytest.raises(OSError, match=r"no room for 0.02 GiB of collected rows in .*tmp \(set TMPDIR"):
            disk_array((5000, 1280), np.float32)  # 24 MiB
        assert os.listdir(disk) == []  # unlinked files: nothing left behind
        del small
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.ray
def test_a_full_disk_is_a_one_line_error_and_a_rerun_after_freeing_space_completes(ray_local, normal_dir, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (disk / "filler").write_bytes(b"\0" * (16 * 2**20 - 48 * 2**10))  # 48 KiB left
        cmd = [sys.executable, "jobs/score.py", "--normal", str(normal_dir), "--query", str(normal_dir),
               "--out", str(disk / "out"), *FAST]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("dnnad: error:") and "No space left on device" in line and "nothing was committed" in line
        assert not (disk / "out" / "run.json").exists()
        (disk / "filler").unlink()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert read_scores(disk / "out").num_rows == 30
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.ray
def test_a_night_of_mostly_unreadable_images_still_writes_its_outputs_but_fails_for_cron(ray_local, normal_dir,
                                                                                          tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["score", "--normal", str(normal_dir), "--query", str(normal_dir), "--out", str(tmp_path / "fit"),
                 "--model", str(model), *FAST]) == 0
    night = tmp_path / "night"
    write_folder(night, cifar_rows("test", None, 3))
    for i in range(7):
        (night / f"empty-{i}.jpg").write_bytes(b"")  # a camera writing empty files
    capsys.readouterr()
    args = ["audit", "--model", str(model), "--query", str(night), "--out", str(tmp_path / "audit"),
            "--date", "2026-12-01", "--quiet"]
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()  # (in-process beside the session's Ray: its INFO lines too)
    assert err[-1:] == ["dnnad: error: 7 of 10 input rows (70.0%) are error rows, more than --max-error-fraction 0.5; "
                   "the outputs are written"]
    record = json.loads((tmp_path / "audit" / "runs" / "2026-12-01.json").read_text())
    assert record["rows"] == {"error": 7, "ok": 3} and record["errors"]["over_limit"]
    assert main([*args, "--overwrite", "--max-error-fraction", "0.8"]) == 0  # the user's own limit
    assert main(["score", "--model", str(model), "--query", str(night), "--out", str(tmp_path / "s"), *FAST]) == 0


@pytest.mark.ray
def test_a_quiet_run_prints_nothing(normal_dir, tmp_path):
    """Through the CLI as cron runs it: one query image for two scoring actors used to print Ray's
    'minimum number of concurrent actors' UserWarning."""
    one = tmp_path / "one"
    write_folder(one, cifar_rows("test", None, 1))
    proc = subprocess.run([sys.executable, "jobs/score.py", "--normal", str(normal_dir), "--query", str(one),
                           "--out", str(tmp_path / "out"), "--score-actors", "2", *FAST],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (proc.stdout, proc.stderr) == ("", "")


@pytest.mark.ray
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_job_ends_its_ray_work_and_the_same_command_resumes_every_row_once(tmp_path, sig):
    """``ray job stop`` and ``kill`` send SIGTERM to the driver, Ctrl-C sends SIGINT to the terminal's process
    group: the driver stops promptly with one line, every process it started ends, and the next identical
    command resumes from the partitions it committed."""
    write_folder(tmp_path / "normal", cifar_rows("train", 1, 30))
    write_folder(tmp_path / "query", cifar_rows("test", None, 200))
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/score.py", "--normal", str(tmp_path / "normal"), "--query", str(tmp_path / "query"),
           "--out", str(out), *RESUMABLE]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.time() + 300
    while not glob.glob(str(out / ".staging-*" / "scores" / ".part-00001.done")):
        assert run.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.2)
    (os.killpg if sig == signal.SIGINT else os.kill)(run.pid, sig)
    _, err = run.communicate(timeout=60)  # promptly
    assert run.returncode == 128 + sig, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"dnnad: stopped by {signal.Signals(sig).name}; nothing was committed")
    assert not (out / "run.json").exists()
    deadline = time.time() + 30
    while left := [p for p in psutil.process_iter(["pid"]) if _session(p.info["pid"]) == run.pid]:
        assert time.time() < deadline, f"processes outlived the stopped job: {[p.name() for p in left]}"
        time.sleep(0.5)
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    record = json.loads((out / "run.json").read_text())
    assert record["partitions_resumed"] >= 2
    ids = pq.read_table(out / "scores")["id"].to_pylist()
    assert len(ids) == 200 and len(set(ids)) == 200


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


@pytest.mark.ray
def test_finished_jobs_leave_no_process_behind_over_many_short_runs(tmp_path):
    """Short runs are where a worker starting as Ray shuts down used to outlive its job (parent init). Every
    process the job started carries the environment it was started with: none may be alive once it returns."""
    data = tmp_path / "data"
    write_folder(data, cifar_rows("train", 1, 12))
    for i in range(5):
        mark = f"run-{i}-{os.getpid()}"
        env = {**os.environ, "DNNAD_TEST_MARK": mark}
        kind = ["rank", "--data", str(data)] if i % 2 else ["score", "--normal", str(data), "--query", str(data)]
        proc = subprocess.run([sys.executable, "-m", "dnnad.cli", *kind, "--out", str(tmp_path / f"out{i}"),
                               "--score-actors", "2", *FAST], cwd=ROOT, env=env, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        left = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("DNNAD_TEST_MARK") == mark:
                    left.append(f"{p.pid} {p.name()}")
            except (psutil.Error, OSError):
                continue
        assert left == [], f"run {i} left {left}"


@pytest.mark.ray
def test_a_read_only_output_is_a_one_line_error(normal_dir, tmp_path):
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = subprocess.run([sys.executable, "jobs/score.py", "--normal", str(normal_dir), "--query", str(normal_dir),
                               "--out", str(disk / "out"), *FAST], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"dnnad: error: Read-only file system: {disk / 'out'}/") and line.endswith(
            "(errno 30); nothing was committed")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.ray
def test_files_that_vanish_or_empty_between_listing_and_reading_become_error_rows(tmp_path):
    """The listing is taken once, before the work; a camera share keeps changing under a long run. Files
    deleted or truncated after the listing are error rows with their reason, every listed row once."""
    write_folder(tmp_path / "normal", cifar_rows("train", 1, 30))
    ids = sorted(write_folder(tmp_path / "query", cifar_rows("test", None, 200)))
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "jobs/score.py", "--normal", str(tmp_path / "normal"), "--query",
                            str(tmp_path / "query"), "--out", str(out), *RESUMABLE], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not glob.glob(str(out / ".staging-*" / "scores" / ".part-00001.done")):
        assert run.poll() is None and time.time() < deadline, "the run ended before the files could change"
        time.sleep(0.2)
    gone, emptied = ids[-20:], ids[-30:-20]  # the last partition: listed, not yet read
    for i in gone:
        (tmp_path / "query" / i).unlink()
    for i in emptied:
        (tmp_path / "query" / i).write_bytes(b"")
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-2000:]
    rows = {r["id"]: r for r in pq.read_table(out / "scores").to_pylist()}
    assert sorted(rows) == ids
    assert {i: rows[i]["error"] for i in gone} == {i: "file not found (missing or a broken link)" for i in gone}
    assert all(rows[i]["status"] == "error" and "empty file" in rows[i]["error"] for i in emptied)
    assert all(rows[i]["status"] == "ok" for i in ids[:-30])


@pytest.fixture
def read_only_s3():
    """moto's S3 server enforcing IAM (its first actions unauthenticated, to set it up): a bucket holding a
    normal set, and a user that may read it but not write."""
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kw = dict(endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="testing",
                  aws_secret_access_key="testing")
        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3", **kw).create_bucket(Bucket="bucket")
                break
            except Exception:  # not listening yet
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="auditor")
        iam.put_user_policy(UserName="auditor", PolicyName="read-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                                    "Resource": "*"}]}))
        key = iam.create_access_key(UserName="auditor")["AccessKey"]
        yield port, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.ray
def test_a_write_the_object_store_refuses_is_a_one_line_error_without_the_secret(read_only_s3, normal_dir):
    """Credentials in the URI's user info (pyarrow's form) that may read but not write: the server answers
    ACCESS_DENIED, and the job ends with one line naming what it could not write, never the secret."""
    port, key, secret = read_only_s3
    out = f"s3://{key}:{quote(secret, safe='')}@bucket/run?endpoint_override=127.0.0.1:{port}&scheme=http" \
          "&region=us-east-1"
    proc = subprocess.run([sys.executable, "jobs/score.py", "--normal", str(normal_dir), "--query", str(normal_dir),
                           "--out", out, *FAST], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("dnnad: error: ") and "ACCESS_DENIED" in line, line
    # it names the path: where the write was refused, or (moto 5.2.6 also refuses HeadObject) where --out was probed
    assert "bucket/run/" in line or "key 'run' in bucket 'bucket'" in line, line
    assert line.endswith("nothing was committed")
    for text in (proc.stdout, proc.stderr):
        assert secret not in text and quote(secret, safe="") not in text
