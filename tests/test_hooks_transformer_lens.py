"""Our hook points hold TransformerLens's values: the same GPT-2-shaped weights, written as a
transformers directory, booted by TransformerLens 4 (compatibility mode, no weight processing)."""

import pytest
import torch

from model.gpt import GPT, GPTConfig
from model.weights.hf import save_hf

tl_bridge = pytest.importorskip("transformer_lens.model_bridge")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def gpt2_tokenizer(directory):
    """GPT-2's tokenizer for transformers, from the vocabulary and merges files tiktoken caches
    (TIKTOKEN_CACHE_DIR, or a download), saved into `directory` and loaded back: TL re-loads it
    by path."""
    import json

    from tiktoken.load import read_file_cached

    try:
        vocab = json.loads(read_file_cached(GPT2_FILES + "encoder.json"))
        merges_text = read_file_cached(GPT2_FILES + "vocab.bpe").decode()
    except Exception as exc:  # no cache and no network
        pytest.skip(f"GPT-2's vocabulary files are not available to tiktoken: {exc}")
    merges = [tuple(line.split()) for line in merges_text.splitlines()[1:] if line.strip()]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    eot = "<|endoftext|>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot,
                                                eos_token=eot, unk_token=eot)
    fast.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2_small_random")
    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_preset("gpt2", n_layer=2, n_head=4, n_embd=64, block_size=64))
    with torch.no_grad():  # biases and norm weights away from 0 and 1, so that they count
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours.eval()
    save_hf(ours, directory)
    tokenizer = gpt2_tokenizer(directory)
    theirs = tl_bridge.TransformerBridge.boot_transformers(str(directory), tokenizer=tokenizer,
                                                           device="cpu")
    theirs.enable_compatibility_mode(no_processing=True)
    theirs.eval()
    return ours, theirs, tokenizer


def test_cached_activations_equal_transformer_lens(both):
    ours, theirs, tokenizer = both
    idx = torch.tensor([tokenizer("The cat sat on the mat and looked")["input_ids"],
                        tokenizer("When Mary and John went to the store")["input_ids"]])
    with torch.no_grad():
        our_logits, our_cache = ours.run_with_cache(idx)
        their_logits, their_cache = theirs.run_with_cache(idx)
    torch.testing.assert_close(our_logits, their_logits, rtol=1e-4, atol=1e-4)
    assert len(our_cache) == 2 + 2 * 17 + 2  # embeddings, 17 per block, final norm
    for name, ours_t in our_cache.items():
        theirs_t = their_cache[name]
        if name.endswith("hook_attn_scores"):  # masked entries: -inf here, a large negative there
            visible = torch.ones(idx.size(1), idx.size(1), dtype=torch.bool).tril()
            ours_t, theirs_t = ours_t[..., visible], theirs_t[..., visible]
        assert ours_t.shape == theirs_t.shape, name
        torch.testing.assert_close(ours_t, theirs_t, rtol=1e-4, atol=1e-5, msg=name)


VIEWS = ("W_E", "W_pos", "W_U", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out",
         "b_Q", "b_K", "b_V", "b_O", "b_in", "b_out")


def test_weight_views_equal_transformer_lens(both):
    ours, theirs, _ = both
    for name in VIEWS:
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0,
                                   msg=name)
    assert ours.W_gate is None and theirs.W_gate is None


def test_grouped_query_swiglu_views_equal_transformer_lens(tmp_path):
    """A Llama-shaped model (rotary, RMSNorm, SwiGLU, 2 key/value heads for 4 query heads, no
    biases), written as a transformers directory: TransformerLens stacks its key/value heads
    unexpanded and repeats them for circuits; ours are repeated already, as HookedTransformer's."""
    from model.weights.hf import save_hf

    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=50257, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                         block_size=64, pos_emb="rope", norm="rmsnorm", activation="swiglu",
                         mlp_ratio=3.0, bias=False, tie_embeddings=False)).eval()
    assert save_hf(ours, tmp_path) == "llama"
    theirs = tl_bridge.TransformerBridge.boot_transformers(
        str(tmp_path), tokenizer=gpt2_tokenizer(tmp_path), device="cpu")
    theirs.enable_compatibility_mode(no_processing=True)
    for name in ("W_E", "W_U", "W_Q", "W_O", "W_in", "W_gate", "W_out"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0,
                                   msg=name)
    for name in ("W_K", "W_V"):
        torch.testing.assert_close(getattr(ours, name),
                                   theirs._expand_kv_heads(getattr(theirs, name)), rtol=0,
                                   atol=0, msg=name)
    assert all(getattr(ours, name) is None for name in VIEWS if name.startswith("b_"))
