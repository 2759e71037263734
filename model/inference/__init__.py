"""The inference wing: using a trained model.

sampling.py (generate), scoring.py (log-probabilities of a text), analysis.py (embeddings,
the next-token distribution, attention, the logit lens), tally.py (parameters by component),
plots.py (figures) and chat_eval.py (held-out chat accuracy). It never imports training.
"""
