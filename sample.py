"""Generate text from a model: python sample.py --prompt "ROMEO:" --temperature 0.8

The command line is model/cli/sample.py; generation is model/inference/sampling.py.
"""

from model.cli.common import exit_at_once
from model.cli.sample import cli

if __name__ == "__main__":
    exit_at_once(cli())
