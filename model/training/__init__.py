"""The training wing: `train(cfg)` and what it needs.

loop.py (the loop and its run), setup.py (what a run prepares before its first step),
finetune.py (starting from pretrained weights), optim.py (optimizers and the schedule),
callbacks.py (your code in the loop) and monitor.py (metrics files and plots). It never
imports inference.
"""
