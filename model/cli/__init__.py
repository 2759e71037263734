"""The command-line wing: every argparse and every print.

train.py and sample.py at the repository root, and `python -m model.<command>`, are thin
doors into these modules: each parses its arguments, calls the library, prints the result,
and turns a SmallGPTError into one line on stderr (common.run_cli).
"""
