"""flexdilated.hf: dilated attention as a transformers ``attn_implementation`` (tiny random Llama, CPU)."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig  # noqa: E402

import flexdilated.hf as fhf  # noqa: E402
from flexdilated import DilatedSpec, reference_dilated_attention  # noqa: E402

VOCAB, N = 97, 61  # N: not a multiple of the largest segment (tails)
FULL = fhf.register("fd_test_full", segment_lengths=(512,), dilation_rates=(1,))
DILATED = fhf.register("fd_test_dilated", segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4))
GROUPED = fhf.register("fd_test_grouped", segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4), heads="grouped",
                       overlap="set")
REF_PAD = {}  # key_padding_mask for the reference implementation, set by a test


def reference_impl(**spec):
    """An attention function straight from the dense reference; registered without a mask function (so
    transformers hands it no mask), padding comes from REF_PAD["pad"]."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert query.shape[2] == key.shape[2], "the reference implementation is for full forwards only"
        s = DilatedSpec(causal=module.is_causal, **spec)
        out = reference_dilated_attention(query, key, value, s, scale=scaling, key_padding_mask=REF_PAD.get("pad"))
        return out.transpose(1, 2).contiguous(), None

    return attention


DILATED_ARGS = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4))
AttentionInterface.register("fd_test_ref_dilated", reference_impl(**DILATED_ARGS))
AttentionInterface.register("fd_test_ref_grouped", reference_impl(**DILATED_ARGS, heads="grouped", overlap="set"))


def config(**kw):
    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0)
    return LlamaConfig(**{**args, **kw})


_weights = {}


def model(impl, dtype=torch.float64, **kw):
    """A tiny Llama (GQA 4/2 heads) with the same random weights for every impl, in eval mode."""
    cfg = config(**kw)
    key = tuple(sorted(kw.items()))
    if key not in _weights:
        torch.manual_seed(0)
        _weights[key] = transformers.LlamaForCausalLM(cfg).state_dict()
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    m.load_state_dict(_weights[key])
    return m.to(dtype).eval()


def tokens(batch=2, n=N, seed=1):
    return torch.randint(1, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def count_calls(monkeypatch, name):
    calls = []
    fn = getattr(fhf, name)
    monkeypatch.setattr(fhf, name, lambda *a, **k: calls.append(a[0].shape) or fn(*a, **k))
    return calls


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_full_cover_equals_sdpa_and_eager(dtype, tol):
    ids = tokens()
    m = model(FULL, dtype)
    assert m.config._attn_implementation == FULL
    got = m(ids).logits
    torch.testing.assert_close(got, model("sdpa", dtype)(ids).logits, atol=tol, rtol=0)
    if dtype == torch.float64:
        # eager takes its softmax in float32 (differs from sdpa by ~1e-7 in float64)
        torch.testing.assert_close(got, model("eager", dtype)(ids).logits, atol=1e-6, rtol=0)
        m.set_attn_implementation(DILATED)  # the name really routes: another pattern, other logits
        assert (m(ids).logits - got).abs().max() > 1e-2


@pytest.mark.parametrize("impl, ref", [(DILATED, "fd_test_ref_dilated"), (GROUPED, "fd_test_ref_grouped")])
def test_dilated_logits_and_grads_equal_reference(impl, ref):
    ids = tokens()
    results = []
    for name in (impl, ref):
        m = model(name).train()
        out = m(ids, labels=ids, use_cache=False)
        out.loss.backward()
        results.append((out.logits, {k: p.grad for k, p in m.named_parameters()}))
    (logits, grads), (ref_logits, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-10, rtol=1e-8, msg=k)
    assert (logits - model("sdpa")(ids).logits).abs().max() > 1e-2  # the pattern is not dense attention


def positions(mask):
    """position_ids as generate makes them from a 2-D attention mask."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_decodes_exactly(monkeypatch, cache):
    steps = count_calls(monkeypatch, "dilated_attention_step")
    m, ids = model(DILATED), tokens(n=45)
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=True,
                     output_logits=True, return_dict_in_generate=True, cache_implementation=cache)
    assert out.sequences.shape == (2, 53) and len(out.logits) == 8
    assert len(steps) == 7 * 2  # every decoding step of both layers went through dilated_attention_step
    full = m(out.sequences, use_cache=False).logits
    # 1e-6: transformers' float32 rotary tables differ ~1e-8 between decoding and a full forward (sdpa too)
    torch.testing.assert_close(torch.stack(out.logits, 1).double(), full[:, 44:52], atol=1e-6, rtol=0)
    assert torch.equal(out.sequences[:, 45:], full[:, 44:52].argmax(-1))


def test_generate_full_cover_equals_sdpa():
    ids = tokens(n=40)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    got, want = (model(impl).generate(ids, **kw) for impl in (FULL, "sdpa"))
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-10, rtol=0)


def test_chunked_prefill_is_exact(monkeypatch):
    """Queries against a longer cache (1 < Nq < Nk): the exact rows; a chunk starting mid-segment too."""
    m, ids = model(DILATED), tokens()
    full = m(ids, use_cache=False).logits
    first = m(ids[:, :27], use_cache=True)
    name = "cache" if hasattr(first, "cache") else "past_key_values"  # transformers 5.24 renamed it
    second = m(ids[:, 27:50], **{name: getattr(first, name)}, use_cache=True)
    third = m(ids[:, 50:], **{name: getattr(second, name)}, use_cache=True)
    got = torch.cat([first.logits, second.logits, third.logits], 1)
    torch.testing.assert_close(got, full, atol=1e-10, rtol=0)


def left_padded(pad=(0, 7)):
    ids, mask = tokens(), torch.ones(2, N, dtype=torch.long)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


def test_left_padding_equals_each_row_alone():
    """The pattern counts from each row's first real token: a left-padded row's logits are those of the row alone;
    a hole after it is removed from the keys where it lies (the reference with that key padding, on the row alone)."""
    ids, mask = left_padded()
    mask[1, 30:33] = 0  # a hole in row 1, after its 7 tokens of padding
    got = model(DILATED)(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(got[0], model(DILATED)(ids[:1]).logits[0], atol=1e-10, rtol=0)
    ref = model("fd_test_ref_dilated")
    try:
        REF_PAD["pad"] = mask[1:, 7:] == 0
        want = ref(ids[1:, 7:], position_ids=positions(mask[1:, 7:])).logits[0]
    finally:
        REF_PAD.clear()
    real = mask[1, 7:].bool()
    torch.testing.assert_close(got[1, 7:][real], want[real], atol=1e-10, rtol=0)
    on_index = ref(ids[1:], position_ids=positions(mask[1:])).logits[0]  # the pattern on the padded index differs
    assert (got[1, 7:][real] - on_index[7:][real]).abs().max() > 1e-3


def test_chunked_prefill_with_left_padding_is_exact():
    """Chunks against the cache (1 < Nq < Nk), rows padded by 0 and 30 tokens: the first chunk ends inside row 1's
    padding, the second starts there; the real rows' logits equal the full forward's."""
    ids, mask = left_padded((0, 30))
    m, pos = model(DILATED), positions(mask)
    full = m(ids, attention_mask=mask, position_ids=pos).logits
    name = "cache" if hasattr(m(ids[:, :1]), "cache") else "past_key_values"
    parts, past = [], None
    for a, b in ((0, 27), (27, 50), (50, N)):
        step = m(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], use_cache=True,
                 **({name: past} if past is not None else {}))
        parts.append(step.logits)
        past = getattr(step, name)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], atol=1e-10, rtol=0)


def test_right_padding_equals_unpadded_sequences():
    ids, mask = tokens(), torch.ones(2, N, dtype=torch.long)
    mask[1, 50:] = 0
    got = model(DILATED)(ids, attention_mask=mask).logits
    alone = model(DILATED)(ids[1:, :50]).logits
    torch.testing.assert_close(got[1, :50], alone[0], atol=1e-10, rtol=0)


def test_left_padded_generate_decodes_exactly():
    ids, mask = left_padded((3, 0))
    m = model(DILATED)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                     return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
    full = m(out.sequences, attention_mask=full_mask, position_ids=positions(full_mask), use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1).double(), full[:, N - 1 : N + 5], atol=1e-6, rtol=0)
    alone = m.generate(ids[:1, 3:], attention_mask=mask[:1, 3:], max_new_tokens=6, do_sample=False,
                       output_logits=True, return_dict_in_generate=True)  # the padded row decodes as if alone
    assert torch.equal(out.sequences[0, 3:], alone.sequences[0])
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], torch.stack(alone.logits, 1)[0], atol=1e-6, rtol=0)


def test_4d_masks():
    ids, mask = left_padded()
    m = model(DILATED)
    want = m(ids, attention_mask=mask).logits
    t = torch.arange(N)
    causal_pad = (t[None, :] <= t[:, None])[None, None] & mask.bool()[:, None, None, :]
    torch.testing.assert_close(m(ids, attention_mask=causal_pad).logits, want, atol=1e-10, rtol=0)
    additive = torch.zeros(2, 1, N, N, dtype=torch.float64).masked_fill(~causal_pad, float("-inf"))
    torch.testing.assert_close(m(ids, attention_mask=additive).logits, want, atol=1e-10, rtol=0)
    window = causal_pad & (t[None, :] > t[:, None] - 8)[None, None]
    with pytest.raises(ValueError, match="not causal attention \\+ key padding"):
        m(ids, attention_mask=window)
    with pytest.raises(ValueError, match="no biases"):
        m(ids, attention_mask=additive + 0.5 * causal_pad)


PACKED = [[20, N - 20], [7, 30, N - 37]]  # sequence lengths packed into each row


def packed_positions(lengths=PACKED):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])


def gpt_bigcode(impl):
    """A tiny GPTBigCode: absolute position embeddings, and its blocks do not pass position_ids to the attention."""
    cfg = transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    m = transformers.GPTBigCodeForCausalLM(cfg)
    m.set_attn_implementation(impl)
    return m.double().eval()


@pytest.mark.parametrize("make", [model, gpt_bigcode], ids=["llama", "gpt_bigcode"])
def test_packed_sequences_equal_each_sequence_alone(make):
    """Packed training rows (``position_ids`` restarting, no attention_mask, as DataCollatorWithFlattening makes
    them): each sequence's logits equal those of the sequence alone, across segment boundaries and tails, whether
    or not the model passes position_ids to its attention (the sequences come with transformers' mask request)."""
    ids, lengths = tokens(), PACKED
    packed = packed_positions()
    m = make(DILATED)
    got = m(ids, position_ids=packed, use_cache=False).logits
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = m(ids[b : b + 1, start : start + n], use_cache=False).logits[0]
            torch.testing.assert_close(got[b, start : start + n], alone, rtol=1e-9, atol=1e-9)
            start += n
    unpacked = m(ids, use_cache=False).logits  # the same tokens as one sequence per row differ
    assert (unpacked[0, 20:] - got[0, 20:]).abs().max() > 1e-3


def test_packed_sequences_from_flash_kwargs_alone_raise():
    """cu_seq_lens without restarting position_ids: flash attention's varlen arguments, which the mask does not
    carry (the rows would be attended whole)."""
    cu = torch.tensor([0, 20, N], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens"):
        model(DILATED)(tokens(batch=1), use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=N - 20,
                       max_length_k=N - 20)
    got = model(DILATED)(tokens(batch=1), position_ids=packed_positions([[20, N - 20]]), use_cache=False,
                         cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=N - 20, max_length_k=N - 20).logits
    want = model(DILATED)(tokens(batch=1), position_ids=packed_positions([[20, N - 20]]), use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # with position_ids as well: the packed route


@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_sequences_as_sdpa(use_cache):
    """With a pattern that covers the row (dense causal attention) packed rows give what sdpa gives, with a cache
    too, where transformers asks for one causal mask over the row: the sequences are kept apart where it asks."""
    ids, packed = tokens(), packed_positions()
    got = model(FULL)(ids, position_ids=packed, use_cache=use_cache).logits
    want = model("sdpa")(ids, position_ids=packed, use_cache=use_cache).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_other_mask_requests_raise():
    """A mask function that is neither causal (or bidirectional) + padding nor transformers' packed request."""
    from transformers.masking_utils import and_masks, causal_mask_function

    no_first_key = and_masks(causal_mask_function, lambda b, h, q, k: k > 0)
    with pytest.raises(ValueError, match="cannot express"):
        fhf.padding_mask(2, 16, 16, mask_function=no_first_key)


def test_unsupported_raise():
    ids = tokens(n=16)
    m = model(DILATED, attention_dropout=0.1)
    m(ids)  # eval: no dropout
    with pytest.raises(ValueError, match="no attention dropout"):
        m.train()(ids)
    with pytest.raises(ValueError, match="output_attentions"):
        model(DILATED)(ids, output_attentions=True)
    torch.manual_seed(0)
    mistral = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                         sliding_window=8)
    with pytest.raises(ValueError, match="sliding"):
        AutoModelForCausalLM.from_config(mistral, attn_implementation=DILATED).eval()(ids)
    for bad in ("sdpa", "eager", "a/b", ""):
        with pytest.raises(ValueError, match="name"):
            fhf.register(bad, segment_lengths=(8,), dilation_rates=(1,))
    with pytest.raises(ValueError, match="equal lengths"):
        fhf.register("fd_test_bad", segment_lengths=(8, 16), dilation_rates=(1,))


def test_causality_comes_from_the_module():
    ids = tokens()
    got, want = (model(impl) for impl in (DILATED, "fd_test_ref_dilated"))
    for m in (got, want):
        for layer in m.model.layers:
            layer.self_attn.is_causal = False
    logits = got(ids).logits
    torch.testing.assert_close(logits, want(ids).logits, atol=1e-10, rtol=0)
    assert (logits - model(DILATED)(ids).logits).abs().max() > 1e-2  # and differs from the causal model
