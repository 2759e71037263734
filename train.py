"""Train a GPT from a YAML config: python train.py --config small.yaml [section.key=value ...]

The command line is model/cli/train.py; the training loop is model/training/loop.py.
"""

import sys

from model.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
