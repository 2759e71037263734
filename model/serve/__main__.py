"""`python -m model.serve`: the command line is model/cli/serve.py."""

from model.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
