"""``python -m pipeline`` and the ``dino-pipeline`` console script."""

from __future__ import annotations

import sys

from pipeline.cli import main as cli_main


def main() -> None:
    """Console entry point."""
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
