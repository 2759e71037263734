"""`python -m model.explore`: the command line is model/cli/explore.py."""

from model.cli.explore import main

if __name__ == "__main__":
    raise SystemExit(main())
