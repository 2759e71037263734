"""The data wing: text and conversations in, token files and batches out.

corpus.py reads sources as streams of documents; tokenizer.py turns text into ids;
token_cache.py is what every token cache shares; prepare.py writes text caches and
chat_data.py conversation caches; batches.py and chat_batches.py cut them into training rows;
chat.py is the chat template and its message type; chat_demo.py builds the offline demo
conversations. It never imports the network. `python -m model.data` is the command line
(model/cli/data.py).
"""
