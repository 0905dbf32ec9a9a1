"""The command line: fast help, flags validated in one place."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnnad.cli import config_from_args, explicit_settings, parser
from dnnad.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_help_is_fast_and_imports_no_torch_faiss_or_ray():
    code = ("import sys, time; t=time.perf_counter(); from dnnad.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(time.perf_counter()-t, [m for m in ('torch', 'faiss', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    seconds, heavy = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert heavy == "[]" and float(seconds) < 1.0


def cfg(*argv):
    ap = parser()
    a = ap.parse_args(list(argv))
    return config_from_args(a, explicit_settings(ap, a))


def test_explicit_settings_are_those_the_user_gave():
    c = cfg("score", "--query", "q", "--out", "o", "--k", "5", "--image-size", "64")
    assert {"k", "image_size", "query", "out"} <= set(c.explicit) and "backbone" not in c.explicit


@pytest.mark.parametrize("argv, flag", [
    (["--k", "0"], "--k"), (["--image-size", "5000"], "--image-size"), (["--threads", "0"], "--threads"),
    (["--shards", "0"], "--shards"), (["--quantile", "1.5"], "--quantile"), (["--batch-size", "0"], "--batch-size"),
    (["--query-sample", "0"], "--query-sample"), (["--group-by", "dir:0"], "--group-by"),
    (["--max-file-bytes", "0"], "--max-file-bytes"), (["--backbone", "vgg"], "unknown backbone"),
])
def test_flag_ranges_are_checked_in_one_place(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        cfg("score", "--query", "q", "--out", "o", *argv).validate()


def test_job_specific_flags():
    with pytest.raises(ConfigError, match="--drop"):
        cfg("rank", "--data", "d", "--out", "o", "--drop", "1.5").validate()
    with pytest.raises(ConfigError, match="--date"):
        cfg("audit", "--model", "m", "--query", "q", "--out", "o", "--date", "yesterday").validate()
    with pytest.raises(ConfigError, match="--model"):
        cfg("audit", "--query", "q", "--out", "o").validate()
    t0 = time.perf_counter()
    cfg("score", "--query", "q", "--out", "o").validate()
    assert time.perf_counter() - t0 < 0.5
