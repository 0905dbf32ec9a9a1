"""The command line: a light --help, flags validated in one place. (How fast --help and validation are is
reported by ``benchmarks/throughput.py --parts cli``.)"""
import subprocess
import sys

import pytest

from dnnad.cli import config_from_args, explicit_settings, parser
from dnnad.config import ConfigError
from tests.helpers import ROOT

pytestmark = pytest.mark.unit


def test_help_imports_no_torch_faiss_or_ray():
    """A fresh interpreter (this one has them all loaded): --help prints the usage and loads none of them."""
    code = ("import sys; from dnnad.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print([m for m in ('torch', 'faiss', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: dnnad" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]"


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
    cfg("score", "--query", "q", "--out", "o").validate()  # validation touches no path: "q" need not exist
