"""Ray job entry point: `python jobs/rank.py ...` locally, or `ray job submit --working-dir . -- python jobs/rank.py ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir on a cluster

from dnnad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["rank", *sys.argv[1:]]))
