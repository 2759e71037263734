"""`python -m model.data SOURCE --tokenizer bpe`: prepare a corpus's token files by hand.

Only the command line lives here; the library is model.corpus (reading sources),
model.prepare (token files) and model.batches (training and evaluation windows).
"""
