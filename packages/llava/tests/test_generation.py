"""Generation through transformers' utilities: greedy, beam search and seeded sampling equal
``LlavaForConditionalGeneration.generate`` on the same weights; repetition penalty, stop strings, streaming,
and prompts that do not fit the context."""

import warnings

import pytest
import torch
import transformers

from mmr_llava import checkpoint as ckpt
from mmr_llava.model import build_model

_EOS, _PAD = 2, 0


def _prompt(cfg, text_len=10, seed=0):
    """One row: text, an image block, text (ids 3..199, never the image token or EOS)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (text_len,), generator=g).tolist()
    ids = ids[:2] + [cfg.image_token_index] * cfg.num_patches + ids[2:]
    return torch.tensor([ids]), torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=g)


@pytest.fixture(scope="module")
def pair():
    """Our tiny model and transformers' llava holding its weights (eager attention on both sides)."""
    model = build_model("tiny", attn_implementation="eager", seed=0).eval()
    config = {k: v for k, v in ckpt.config_to_hf(model.config).items() if k not in ("architectures", "transformers_version")}
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**config, attn_implementation="eager"))
    missing, unexpected = hf.load_state_dict(ckpt.to_hf_keys(model.state_dict()), strict=False)
    assert not missing and not unexpected
    return model, hf.eval()


# Sampling settings are compared under the same seed: both sides run the same processors (temperature, top-k,
# top-p, in transformers' order) on logits of the same float32 modules and draw with torch.multinomial from
# the global generator, so the draws agree as long as the logits do (they differ by rounding only, ~1e-7).
@pytest.mark.parametrize("options", [
    dict(temperature=0.0),
    dict(temperature=0.0, num_beams=3),
    dict(temperature=0.8, top_p=0.9, top_k=20),
    dict(temperature=1.5, top_p=1.0, top_k=0),
], ids=["greedy", "beam3", "sample_topk_topp", "sample_plain"])
def test_generation_equals_transformers_llava(pair, options):
    model, hf = pair
    ids, pixels = _prompt(model.config)
    hf_options = {"do_sample": options["temperature"] > 0, "num_beams": options.get("num_beams", 1)}
    if hf_options["do_sample"]:
        hf_options.update(temperature=options["temperature"], top_p=options["top_p"], top_k=options["top_k"])
    for seed in range(3):
        torch.manual_seed(seed)
        ours = model.generate(ids, pixels, max_new_tokens=12, eos_token_id=_EOS, pad_token_id=_PAD, **options)
        torch.manual_seed(seed)
        with torch.no_grad():
            theirs = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=12, eos_token_id=_EOS, pad_token_id=_PAD, **hf_options)
        assert ours.tolist() == theirs[:, ids.shape[1]:].tolist(), seed
        if not hf_options["do_sample"]:
            break


def test_sampling_settings_change_the_draws(pair):
    """Same seed, different settings: different samples (the options reach the processors); top_k=1 is greedy."""
    model, _ = pair
    ids, pixels = _prompt(model.config, seed=1)
    runs = {}
    for name, options in {"hot": dict(temperature=2.0, top_k=0), "cold": dict(temperature=0.3, top_k=0),
                          "top1": dict(temperature=2.0, top_k=1), "greedy": dict(temperature=0.0)}.items():
        torch.manual_seed(0)
        runs[name] = model.generate(ids, pixels, max_new_tokens=16, **options).tolist()
    assert runs["top1"] == runs["greedy"] and runs["hot"] != runs["cold"]


def test_repetition_penalty_and_stop_ids(pair):
    model, _ = pair
    ids, pixels = _prompt(model.config, seed=2)
    plain = model.generate(ids, pixels, max_new_tokens=24)[0].tolist()
    assert len(set(plain)) < len(plain)  # a random tiny model repeats itself: the penalty has work to do
    # A huge penalty makes every generated token's logit the lowest in its row, so none comes twice (it counts
    # only generated tokens, as the original's inputs_embeds generation does).
    penalised = model.generate(ids, pixels, max_new_tokens=24, repetition_penalty=1e6)[0].tolist()
    assert len(set(penalised)) == len(penalised) == 24 and penalised[0] == plain[0]
    # A row stops at any of several end ids; the rest of a finished row is padding.
    stop_at = plain[5]
    first = plain.index(stop_at)
    out = model.generate(ids, pixels, max_new_tokens=24, eos_token_id=[999, stop_at])[0].tolist()
    assert out == plain[: first + 1]


def test_stop_strings_and_streaming(pair):
    from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

    model, _ = pair
    tok = train_tiny_tokenizer(["a red circle and two blue squares", "the green triangle is left of it"], 200)
    ids, pixels = _prompt(model.config, seed=3)
    steps = []
    plain = model.generate(ids, pixels, max_new_tokens=16, on_token=lambda t: steps.append(int(t[0])))[0].tolist()
    assert steps == plain  # the callback saw each new token once, in order, and no prompt token
    streamer = transformers.TextIteratorStreamer(tok)
    model.generate(ids, pixels, max_new_tokens=16, streamer=streamer)
    assert "".join(streamer) == tok.decode(plain)
    # Stop at the first token whose text is new to the decoded reply (so that the cut is unambiguous).
    stop_index = next(i for i in range(2, 16) if tok.decode(plain[i]).strip()
                      and tok.decode(plain[i]).strip() not in tok.decode(plain[:i]))
    stop = tok.decode(plain[stop_index]).strip()
    out = model.generate(ids, pixels, max_new_tokens=16, stop_strings=[stop], tokenizer=tok)[0].tolist()
    assert out == plain[: stop_index + 1]


def test_prompt_longer_than_the_context_is_an_error(pair):
    model, _ = pair
    context = model.context_length
    assert context == 512
    cfg = model.config
    ids, pixels = _prompt(cfg, text_len=context - cfg.num_patches)
    with pytest.raises(ValueError, match=f"the prompt has {context} tokens .* context is {context}"):
        model.generate(ids, pixels, max_new_tokens=4)
    ids, pixels = _prompt(cfg, text_len=context - cfg.num_patches - 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(ids, pixels, max_new_tokens=10)
    assert out.shape[1] <= 3 and any("capped to 3" in str(w.message) for w in caught)
