"""The network wing: what a GPT is made of besides model/gpt.py.

hooks.py (hook points by TransformerLens's names), activation_cache.py (what run_with_cache
returns) with logit_lens.py (its logit lens) and slicing.py (TransformerLens's Slice semantics),
views.py (GPT's weights by TransformerLens's names, its parts), text.py (the model's tokenizer:
text in, to_tokens and friends), kv_cache.py (keys and values for generation), lora.py
(low-rank adapters) and packed.py (linear layers repacked for fast CPU decoding). It imports no
other wing.
"""
