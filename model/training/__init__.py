"""The training wing: `train(cfg)` and what it needs.

loop.py (the loop and its run), setup.py (what a run prepares before its first step),
finetune.py (starting from pretrained weights), optim.py (optimizers and the schedule),
callbacks.py (your code in the loop, and how a run reports), monitor.py (metrics files and
plots) and distributed.py (a job's processes under torchrun, seeds, Ctrl-C). It never imports
inference and never prints: the command line's reporter is a callback (model/cli/train.py).
"""
