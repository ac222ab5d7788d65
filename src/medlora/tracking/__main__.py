"""`python -m medlora.tracking replay <run folder>`: send the MLflow writes a run saved in its
tracking_backlog.jsonl because the store did not answer when it ended. Safe to run again: what
MLflow holds already is not sent twice."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medlora.config import MedloraError
from medlora.tracking.writer import BACKLOG, replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlora.tracking", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("replay", help=f"send a run folder's {BACKLOG} to MLflow")
    command.add_argument("run_folder", type=Path, help="the run's folder, e.g. outputs/runs/<time>")
    command.add_argument("--tracking-uri", help="send to this MLflow instead of the one the run logged to")
    args = parser.parse_args(argv)
    # each run's line below names it; MLflow would add a link per closed run
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        for line in replay(args.run_folder, args.tracking_uri):
            print(line)
    except MedloraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
