"""Ray job entry point: `python jobs/audit.py --model DIR --query PATH --out ROOT`, e.g. nightly from cron,
or `ray job submit --working-dir . -- python jobs/audit.py ...` on a cluster."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir on a cluster

from dnnad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
