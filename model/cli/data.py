"""The command line of `python -m model.data`: tokenize a corpus into the data cache."""

from __future__ import annotations

import argparse

from model.cli.common import run_cli
from model.cli.progress import bars
from model.data.config import DataConfig
from model.data.prepare import prepare_data
from model.data.token_cache import SPLITS
from model.progress import silent


def main(argv: list[str] | None = None) -> int:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(prog="python -m model.data",
                                     description="Tokenize a corpus into the data cache.")
    parser.add_argument("source", nargs="?", default=defaults.source,
                        help="shakespeare, a .txt file, a directory, a glob, or hf:NAME")
    parser.add_argument("--tokenizer", default=defaults.tokenizer, help="gpt2, char or bpe")
    parser.add_argument("--bpe-vocab-size", type=int, default=defaults.bpe_vocab_size)
    parser.add_argument("--bpe-sample-mb", type=float, default=defaults.bpe_sample_mb,
                        help="MB of training text the bpe merges are learned from")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--num-proc", type=int, default=defaults.num_proc)
    parser.add_argument("--block-size", type=int, default=256,
                        help="only checked: each split must hold one window of this + 1 tokens")
    parser.add_argument("--hf-config", default=None)
    parser.add_argument("--hf-split", default=defaults.hf_split)
    parser.add_argument("--text-column", default=defaults.text_column)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def run() -> int:
        cfg = DataConfig(source=args.source, hf_config=args.hf_config, hf_split=args.hf_split,
                         text_column=args.text_column, tokenizer=args.tokenizer,
                         bpe_vocab_size=args.bpe_vocab_size, bpe_sample_mb=args.bpe_sample_mb,
                         val_fraction=args.val_fraction, cache_dir=args.cache_dir,
                         num_proc=args.num_proc)
        data = prepare_data(cfg, args.block_size, progress=silent if args.no_progress else bars)
        print(f"{'reused' if data.reused else 'wrote'} {data.dir} ({data.tokenizer.name}, "
              f"{data.tokenizer.vocab_size} tokens)")
        for split in SPLITS:
            print(f"  {split}: {data.num_tokens(split):,} tokens, "
                  f"{data.bytes_per_token(split):.3f} bytes/token")
        return 0

    return run_cli(run)
