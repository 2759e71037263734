"""`python -m model.export`: the command line is model/cli/export.py."""

from model.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
