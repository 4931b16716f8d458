"""``python -m saeflow.viewer --db results/features.sqlite [--root results] [--port 8765]``"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeflow.viewer", description=__doc__)
    p.add_argument("--db", required=True, help="feature database: SQLite path or postgresql:// URL")
    p.add_argument("--root", default=None,
                   help="results folder the SAE and model paths are relative to "
                        "(default: the SQLite file's folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8765, help="port")
    args = p.parse_args(argv)
    if "://" not in args.db and not Path(args.db).exists():
        p.error(f"--db {args.db}: no such file; build it with snakemake (rule load_features)")
    import uvicorn

    from saeflow.viewer.app import create_app

    uvicorn.run(create_app(args.db, args.root), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
