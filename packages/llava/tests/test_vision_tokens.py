"""``mm_use_im_start_end`` / ``mm_use_im_patch_token``: tokens, layout, stage-1 training and hand-over to stage 2."""

import os

import pytest
import torch

from mmr_llava import checkpoint as ckpt
from mmr_llava.conversation import (
    IM_END,
    IM_PATCH,
    IM_START,
    add_vision_tokens,
    prepare_tokenizer,
    tokenize_with_labels,
)
from mmr_llava.miniature.scenes import write_dataset
from mmr_llava.tiny_tokenizer import train_tiny_tokenizer
from mmr_llava.train import TrainConfig, train

MSGS = [{"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "A red cube."}]


def test_image_block_wrapped_in_start_end():
    tok = train_tiny_tokenizer(["what is here? a red cube. a blue ball."] * 4, 120)
    image_id = prepare_tokenizer(tok, "v1")
    before = len(tok)
    wrap = add_vision_tokens(tok, use_im_start_end=True, use_im_patch_token=True)
    # The original's order: <im_patch> first, then <im_start>, <im_end> as the last two ids.
    assert tok.convert_tokens_to_ids([IM_PATCH, IM_START, IM_END]) == [before, before + 1, before + 2]
    assert wrap == (before + 1, before + 2)
    assert add_vision_tokens(tok, True, True) == wrap and len(tok) == before + 3  # idempotent
    plain = tokenize_with_labels(tok, "v1", MSGS, image_token_id=image_id, num_patches=3)
    wrapped = tokenize_with_labels(tok, "v1", MSGS, image_token_id=image_id, num_patches=3, image_wrap=wrap)
    i = wrapped["input_ids"].index(image_id)
    assert wrapped["input_ids"][i - 1: i + 4] == [wrap[0], image_id, image_id, image_id, wrap[1]]
    assert len(wrapped["input_ids"]) == len(plain["input_ids"]) + 2
    assert wrapped["labels"][i - 1] == wrapped["labels"][i + 3] == -100  # never supervised
    # Same supervised tokens: the answer is untouched.
    assert [x for x in wrapped["labels"] if x != -100] == [x for x in plain["labels"] if x != -100]
    assert add_vision_tokens(tok, False, False) is None


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("scenes_se"), n_scenes=8, seed=1)


def test_stage1_trains_only_start_end_rows_and_stage2_loads_them(scenes, tmp_path):
    os.environ["MMR_NO_PROGRESS"] = "1"
    common = dict(image_folder=str(scenes["instruct"].parent), micro_batch_size=4, log_every=1, tokenizer_vocab=200,
                  mm_use_im_start_end=True, mm_use_im_patch_token=True)
    s1 = train(TrainConfig(model="tiny", data=str(scenes["captions"]), output_dir=str(tmp_path / "s1"), template="plain",
                           tune="projector", lr=1e-2, max_steps=3, weight_decay=0.1, **common))
    assert s1["step"] == 3
    model = ckpt.load_pretrained(tmp_path / "s1" / "model")
    assert model.config.mm_use_im_start_end and model.config.mm_use_im_patch_token
    emb = model.language_model.get_input_embeddings().weight.detach()
    out_emb = model.language_model.get_output_embeddings().weight.detach()

    # The same fresh model as stage 1 started from (same seed and tokenizer) for the "before" weights.
    from transformers import AutoTokenizer

    from mmr_llava.train import build_model_for

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "s1" / "tokenizer"))
    image_id = prepare_tokenizer(tok, "plain")
    wrap = add_vision_tokens(tok, True, True)
    assert wrap == (len(tok) - 2, len(tok) - 1)
    init = build_model_for(TrainConfig(model="tiny", data="x", tokenizer_vocab=200, mm_use_im_start_end=True), tok, image_id, wrap)
    e0 = init.language_model.get_input_embeddings().weight.detach()
    o0 = init.language_model.get_output_embeddings().weight.detach()
    # New rows start at the mean of the other rows (input and output embeddings), as in the original.
    torch.testing.assert_close(e0[-2:], e0[:-2].mean(0, keepdim=True).expand(2, -1))
    torch.testing.assert_close(o0[-1], o0[:-2].mean(0))

    # Stage 1 moved the <im_start>/<im_end> rows and nothing else of the language model.
    assert not torch.allclose(emb[-2:], e0[-2:])
    torch.testing.assert_close(emb[:-2], e0[:-2], rtol=0, atol=0)
    torch.testing.assert_close(out_emb, o0, rtol=0, atol=0)
    for (name, p), (_, p0) in zip(model.language_model.named_parameters(), init.language_model.named_parameters()):
        if "embed_tokens" not in name:
            torch.testing.assert_close(p, p0, rtol=0, atol=0, msg=name)

    # mm_projector.bin carries the embedding (original key); stage 2 copies the two trained rows.
    saved = torch.load(tmp_path / "s1" / "mm_projector.bin", weights_only=True)
    torch.testing.assert_close(saved[ckpt.EMBED_KEY], emb)
    fresh = build_model_for(TrainConfig(model="tiny", data="x", seed=5, mm_use_im_start_end=True), tok, image_id, wrap)
    ckpt.load_projector(fresh, tmp_path / "s1" / "mm_projector.bin")
    got = fresh.language_model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(got[-2:], emb[-2:])
    assert not torch.allclose(got[:-2], emb[:-2])  # the rest is the stage-2 model's own
    with pytest.raises(ValueError, match="mm_use_im_start_end"):
        ckpt.config_to_hf(model.config)
