"""Our hook points hold TransformerLens's values: the same GPT-2-shaped weights, written as a
transformers directory, booted by TransformerLens 4 (compatibility mode, no weight processing)."""

import pytest
import torch

from model.data.tokenizer import GPT2Tokenizer
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
    ours.tokenizer = GPT2Tokenizer()  # as load_model would (single-token strings as targets)
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


VIEWS = ("W_E", "W_pos", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out",
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
    assert all(getattr(ours, name) is None for name in VIEWS if name.startswith("b_")
               and name != "b_U")  # b_U: zeros, as TransformerLens's unembedding


PROMPTS = ["The cat sat on the mat and looked", "When Mary and John went to the store",
           "A quick brown fox jumps over the dog"]


def token_batch(tokenizer, batch):
    """(batch, 8) ids: the prompts cut to the same length."""
    return torch.tensor([tokenizer(p)["input_ids"][:8] for p in PROMPTS[:batch]])


def caches(both, batch):
    ours, theirs, tokenizer = both
    idx = token_batch(tokenizer, batch)
    with torch.no_grad():
        return ours.run_with_cache(idx), theirs.run_with_cache(idx)


def assert_same(ours, theirs, what):
    """Equal labels (when both are (stack, labels)) and values within float rounding."""
    if isinstance(ours, tuple):
        assert ours[1] == theirs[1], what
        ours, theirs = ours[0], theirs[0]
    assert ours.shape == theirs.shape, what
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=what)


@pytest.mark.parametrize("batch", [1, 3])
def test_residual_stacks_equal_transformer_lens(both, batch):
    """accumulated_resid, decompose_resid and stack_head_results: the same labels and values
    for every layer convention, position selection and normalisation, at batch 1 and 3."""
    (_, ours), (_, theirs) = caches(both, batch)
    for layer in (None, -1, 1):
        for pos_slice in (None, -1, (1, 4), [0, 5]):
            for apply_ln in (False, True):
                args = dict(pos_slice=pos_slice, apply_ln=apply_ln, return_labels=True)
                for incl_mid in (False, True):
                    assert_same(ours.accumulated_resid(layer, incl_mid, **args),
                                theirs.accumulated_resid(layer, incl_mid, **args),
                                f"accumulated_resid {layer} {incl_mid} {args}")
                assert_same(ours.stack_head_results(layer, incl_remainder=True, **args),
                            theirs.stack_head_results(layer, incl_remainder=True, **args),
                            f"stack_head_results {layer} {args}")
                assert_same(ours.decompose_resid(layer, **args),
                            theirs.decompose_resid(layer, **args), f"decompose_resid {args}")
    args = dict(mlp_input=True, pos_slice=-1, apply_ln=True, return_labels=True)
    assert_same(ours.accumulated_resid(1, **args), theirs.accumulated_resid(1, **args), "mlp")
    assert_same(ours.decompose_resid(1, **args), theirs.decompose_resid(1, **args), "mlp")


def test_logit_lens_equals_transformer_lens(both):
    (logits, ours), (_, theirs) = caches(both, 3)
    lens = ours.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True)
    torch.testing.assert_close((lens @ both[0].W_U)[-1], logits[:, -1], rtol=0, atol=1e-5)
    for kwargs in (dict(targets=[5, " the"], return_type="log_probs"),
                   dict(top_k=3, positions=None, incl_mid=True),
                   dict(vocab=[1, 2, 3], positions=(2, 6), return_type="probs", layers=[0, -1])):
        mine = ours.logit_lens(**kwargs)
        theirs_lens = theirs.logit_lens(**kwargs)
        assert mine.labels == theirs_lens.labels
        assert_same(mine.values, theirs_lens.values, str(kwargs))
        assert_same(mine.entropy, theirs_lens.readout.entropy, str(kwargs))
    assert torch.equal(mine_top := ours.logit_lens(top_k=3).top_ids,
                       theirs.logit_lens(top_k=3).readout.top_ids), mine_top
    ranks = ours.logit_lens(targets=" the").rank_trajectory(" the")
    theirs_ranks = theirs.logit_lens(targets=" the").rank_trajectory(" the")
    assert (ranks - theirs_ranks).abs().max() <= 1  # ties among 50257 logits: float rounding


def test_patching_sweeps_equal_transformer_lens(both):
    from transformer_lens import patching as their_patching

    from model import patching

    ours, theirs, tokenizer = both
    clean = torch.tensor([tokenizer("Mary and John met; John thanked")["input_ids"]])
    corrupted = clean.clone()
    corrupted[0, 0] = tokenizer(" Alice")["input_ids"][0]

    def metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 7]

    with torch.no_grad():
        _, our_cache = ours.run_with_cache(clean)
        _, their_cache = theirs.run_with_cache(clean)
    for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos",
                 "get_act_patch_attn_head_out_by_pos"):
        mine = getattr(patching, name)(ours, corrupted, our_cache, metric)
        expected = getattr(their_patching, name)(theirs, corrupted, their_cache, metric)
        assert_same(mine, expected, name)


def test_a_loaded_model_tokenizes_as_transformer_lens(both, tmp_path_factory):
    """load_model gives the model its tokenizer: to_tokens and friends, and text as input."""
    from model import load_model

    ours, theirs, tokenizer = both
    directory = tmp_path_factory.mktemp("gpt2_loaded")
    save_hf(ours, directory)
    model = load_model(str(directory)).model
    text = "When Mary and John went"
    ids = model.to_tokens(text)
    assert torch.equal(ids, theirs.to_tokens(text, prepend_bos=False))
    assert torch.equal(model.to_tokens(text, prepend_bos=True), theirs.to_tokens(text))
    assert model.to_str_tokens(text) == theirs.to_str_tokens(text, prepend_bos=False)
    assert model.to_string(ids) == theirs.to_string(ids)
    assert model.to_single_token(" Mary") == theirs.to_single_token(" Mary")
    with torch.no_grad():
        torch.testing.assert_close(model(text)[0], theirs(text, prepend_bos=False))
        assert_same(model.run_with_hooks(text, return_type="loss"),
                    theirs.run_with_hooks(text, return_type="loss", prepend_bos=False), "loss")
