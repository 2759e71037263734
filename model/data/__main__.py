"""`python -m model.data`: the command line is model/cli/data.py."""

from model.cli.data import main

if __name__ == "__main__":
    raise SystemExit(main())
