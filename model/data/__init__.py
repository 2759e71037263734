"""The data wing: text and conversations in, token files and batches out.

config.py holds the data settings (DataConfig); corpus.py reads sources as streams of
documents; tokenizer.py turns text into ids; token_cache.py is the one protocol every token
cache follows (fingerprint directory, staged files, meta.json last, reopen checks, hash split);
prepare.py writes text caches and chat_data.py conversation caches; batches.py and
chat_batches.py cut them into training rows; chat.py is the chat template, its one message type
and validation, and a chat session's history; chat_demo.py builds the offline demo
conversations. It imports only the base modules, never the network. `python -m model.data` is
the command line (model/cli/data.py).
"""
