"""The weights wing: a model's files, read and written.

checkpoint.py (smallgpt's checkpoints), meta.py (a model built without memory, then given the
loaded tensors), loading.py (one name -> model and tokenizer: a run, a checkpoint, a Hugging
Face directory, gpt2*), hf.py and hf_rotary.py (the Hugging Face layouts both ways),
hf_tokenizer.py (tokenizer files) and export.py. It never imports training, inference, serve
or the command lines.
"""
