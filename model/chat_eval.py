"""`python -m model.chat_eval`: the command line is model/cli/chat_eval.py."""

from model.cli.chat_eval import main

if __name__ == "__main__":
    raise SystemExit(main())
