"""Chat CLI (streaming), batched generation and ScienceQA scoring."""

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mmr_llava import checkpoint as ckpt
from mmr_llava import scienceqa as sqa
from mmr_llava.cli import main as cli_main
from mmr_llava.inference import answer_batch, load_for_inference
from mmr_llava.miniature.scenes import write_dataset
from mmr_llava.model import IMAGE_SENTINEL, LlavaConfig, build_model
from mmr_llava.train import TrainConfig, train

PROBLEMS = {
    "1": {"question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1, "hint": "",
          "image": None, "subject": "natural science", "grade": "grade3"},
    "2": {"question": "Which word is a noun?", "choices": ["run", "dog", "blue"], "answer": 1,
          "hint": "Pick one.", "image": "image.png", "subject": "language science", "grade": "grade8"},
    "3": {"question": "Which city is a capital?", "choices": ["Paris", "Lyon"], "answer": 0, "hint": "",
          "image": "image.png", "subject": "social science", "grade": "grade6"},
}


def test_sqa_prompt_parse_and_score():
    q = sqa.build_question(PROBLEMS["2"])
    assert q == ("<image>\nWhich word is a noun?\nContext: Pick one.\nOptions: (A) run (B) dog (C) blue\n"
                 "Answer with the option's letter from the given choices directly.")
    assert "Context: N/A" in sqa.build_question(PROBLEMS["1"])
    assert [sqa.parse_answer(t, 3) for t in ["B", "(C)", "A.", "The answer is B.", "dog", "D"]] == [1, 2, 0, 1, -1, -1]
    s = sqa.score(PROBLEMS, {"1": 1, "2": 0, "3": 0})
    assert s["Avg"] == pytest.approx(200 / 3) and s["NAT"] == 100 and s["LAN"] == 0 and s["SOC"] == 100
    assert s["NO"] == 100 and s["IMG"] == 50 and s["TXT"] == 0 and s["G1-6"] == 100 and s["G7-12"] == 0
    assert "| NAT |" in sqa.format_table(s)


def test_sqa_score_is_the_shared_scorer_on_the_golden_table():
    """One scorer for the repository: the golden table of mmr-core's tests, through ``sqa.score``."""
    golden = json.loads((Path(__file__).resolve().parents[3] / "shared" / "tests" / "data"
                         / "scienceqa_golden.json").read_text())
    scores = sqa.score(golden["problems"], golden["predictions"])  # p7 has no prediction: wrong
    # [correct, total] pairs of small integers, divided once in float64 here and in the scorer: equal.
    assert scores == {c: 100.0 * hit / total for c, (hit, total) in golden["expected"].items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    os.environ["MMR_NO_PROGRESS"] = "1"
    root = tmp_path_factory.mktemp("use")
    paths = write_dataset(root / "data", n_scenes=6, seed=3)
    train(TrainConfig(model="tiny", data=str(paths["instruct"]), image_folder=str(root / "data"), output_dir=str(root / "run"),
                      micro_batch_size=4, max_steps=1, tokenizer_vocab=200))
    return root


def test_batched_answers_match_single(trained):
    model, tok = load_for_inference(trained / "run" / "model")
    img = str(trained / "data" / "images" / "3_00000.png")
    convs = [[{"from": "human", "value": "<image>\nHow many shapes are in the image?"}],
             [{"from": "human", "value": "Is there a red shape in this long question about the picture?"}]]
    batched = answer_batch(model, tok, "v1", convs, [[img], []], max_new_tokens=6)
    single = [answer_batch(model, tok, "v1", [c], [i], max_new_tokens=6)[0] for c, i in zip(convs, [[img], []])]
    assert batched == single and all(isinstance(b, str) for b in batched)


def test_chat_cli_streams(trained, capsys):
    img = str(trained / "data" / "images" / "3_00001.png")
    cli_main(["chat", "--model", str(trained / "run" / "model"), "--image", img, "--prompt", "What color?",
              "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert out.endswith("\n")


def test_eval_sqa_cli(trained, tmp_path, capsys):
    from PIL import Image

    for pid in ("2", "3"):
        (tmp_path / "img" / pid).mkdir(parents=True)
        Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(tmp_path / "img" / pid / "image.png")
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    cli_main(["eval-sqa", "--model", str(trained / "run" / "model"), "--problems", str(tmp_path / "problems.json"),
              "--image-folder", str(tmp_path / "img"), "--batch-size", "2", "--out", str(tmp_path / "a.jsonl")])
    out = capsys.readouterr().out
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in out
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3


# -- official vocabularies: a tokenizer of exactly the model's vocabulary size ----------------------

def _official_vocab_model(vocab_size: int):
    """The tiny sizes with LLaVA-1.5's vocabulary facts: ``vocab_size`` rows, no ``<image>`` row, and the
    image token index one past the vocabulary (what an original config without the key means)."""
    tiny = LlavaConfig.from_name("tiny")
    cfg = dataclasses.replace(tiny, text=dict(tiny.text, vocab_size=vocab_size), image_token_index=vocab_size)
    return build_model(cfg, attn_implementation="eager", seed=0).eval()


def _original_prompt_ids(tok, text: str, num_patches: int) -> list[int]:
    """The original's ``tokenizer_image_token`` (each ``<image>``-separated chunk tokenized with BOS, the BOS
    kept once), with its single -200 per image widened to the ``num_patches`` positions our model takes."""
    chunks = [tok(chunk)["input_ids"] for chunk in text.split("<image>")]
    skip = 1 if chunks[0][:1] == [tok.bos_token_id] else 0
    ids = chunks[0][:skip]
    for k, chunk in enumerate(chunks):
        ids += ([IMAGE_SENTINEL] * num_patches if k else []) + chunk[skip:]
    return ids


def _transformers_copy(model, image_token_index: int):
    """transformers' llava with ``model``'s weights; its image token must be an id inside the vocabulary."""
    import transformers

    config = {k: v for k, v in ckpt.config_to_hf(model.config).items() if k not in ("architectures", "transformers_version")}
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**{**config, "image_token_index": image_token_index}))
    missing, unexpected = hf.load_state_dict(ckpt.to_hf_keys(model.state_dict()), strict=False)
    assert not missing and not unexpected
    return hf.eval()


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_chat_with_a_tokenizer_of_exactly_the_vocabulary(tmp_path, llama_tokenizer, layout, caplog):
    """LLaVA-1.5's case: 32,000 rows, a 32,000-token tokenizer without <image>. Loading neither adds tokens
    nor resizes, the prompt holds the original's ids (-200 at the image), and the reply is transformers'
    greedy continuation of those ids on the same weights."""
    from PIL import Image

    from mmr_llava.conversation import render

    saved = _official_vocab_model(len(llama_tokenizer))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt.save_pretrained(saved, tmp_path, layout=layout)
    # transformers cannot run such an HF-layout folder with images (no image row): the writer says so.
    assert bool([w for w in caught if "has no row in the vocabulary" in str(w.message)]) == (layout == "hf")
    llama_tokenizer.save_pretrained(tmp_path)
    # LLaVA-1.5's tokenizer_config.json has add_bos_token true (the fixture's tokenizer adds no BOS).
    AutoTokenizer.from_pretrained(tmp_path, add_bos_token=True).save_pretrained(tmp_path)
    # A plain AutoTokenizer load reads config.json and warns about "llava_llama"; load_for_inference must not.
    warned = [r for r in caplog.records if "model of type `llava_llama`" in r.getMessage()]
    assert bool(warned) == (layout == "original")
    caplog.clear()
    model, tok = load_for_inference(tmp_path)
    assert not [r for r in caplog.records if "model of type" in r.getMessage()]
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    assert len(tok) == model.vocab_size == 32000 and "<image>" not in tok.get_vocab()
    calls = []
    generate = model.generate
    model.generate = lambda *a, **k: calls.append((a, generate(*a, **k))) or calls[-1][1]
    conv = [{"from": "human", "value": "<image>\nWhat is in the picture? Answer in a few words."}]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    reply = answer_batch(model, tok, "v1", [conv], [[image]], max_new_tokens=8)[0]
    (ids, pixels, _), new = calls[0]
    prompt = render("v1", conv, add_generation_prompt=True)[0]
    assert ids[0].tolist() == _original_prompt_ids(tok, prompt, model.config.num_patches)
    # <unk> (id 0) never occurs in this prompt (SentencePiece byte fallback), so it can mark transformers' images.
    hf = _transformers_copy(saved, image_token_index=0)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids.masked_fill(ids == IMAGE_SENTINEL, 0), pixel_values=pixels,
                               attention_mask=torch.ones_like(ids),  # else id 0, the pad id, would be masked
                               max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert new.shape[1] >= 1 and new[0].tolist() == expected[: new.shape[1]].tolist()
    assert isinstance(reply, str)
    for name, tensor in saved.state_dict().items():  # loading changed no weight (no resize, no new rows)
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_tokenizer_fit_checks(tmp_path, llama_tokenizer):
    """An unused <image> past the vocabulary is fine (the sentinel marks images); any other token without a
    row, or an image_token_index that is an ordinary token, is a named error."""
    from mmr_llava.inference import check_tokenizer_fits, image_token_id

    model = _official_vocab_model(len(llama_tokenizer))
    llama_tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    check_tokenizer_fits(model, tok)
    assert image_token_id(tok, model) == IMAGE_SENTINEL
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})  # what prepare_tokenizer used to do
    check_tokenizer_fits(model, tok)  # 32,001 tokens: the extra one is <image>, at image_token_index
    assert image_token_id(tok, model) == model.config.image_token_index == tok.convert_tokens_to_ids("<image>")
    tok.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=r"tokenizer has 32002 tokens .*'<extra>'"):
        check_tokenizer_fits(model, tok, "my/tokenizer")
    ordinary = dataclasses.replace(model.config, image_token_index=5)
    model.config = ordinary
    with pytest.raises(ValueError, match="my/tokenizer: the model's image_token_index 5 is the tokenizer's token"):
        check_tokenizer_fits(model, AutoTokenizer.from_pretrained(tmp_path), "my/tokenizer")


def test_a_folder_shaped_like_llava_v15_chats(tmp_path, llama_tokenizer):
    """Everything a released LLaVA-1.5 folder has at once: config.json with model_type "llava" and no fields of
    ours (the tower's sizes come from mm_vision_tower), no vision tower weights, a 32,000-token tokenizer for
    32,000 rows. It chats with the same reply as the full folder of the same weights."""
    import transformers
    from PIL import Image
    from safetensors.torch import load_file, save_file

    saved = _official_vocab_model(len(llama_tokenizer))
    full, released, clip = tmp_path / "full", tmp_path / "released", tmp_path / "clip"
    for folder in (full, released):
        ckpt.save_pretrained(saved, folder, layout="original")
        llama_tokenizer.save_pretrained(folder)
        type(llama_tokenizer).from_pretrained(folder, add_bos_token=True).save_pretrained(folder)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=saved.config.vision, text_config=text,
                                                           projection_dim=32))
    model.vision_model.load_state_dict(saved.vision_tower.state_dict())
    model.save_pretrained(clip)
    config = json.loads((released / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("mmr_")}
    config.update(model_type="llava", mm_vision_tower=str(clip))
    (released / "config.json").write_text(json.dumps(config))
    weights = load_file(str(released / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("model.vision_tower.")},
              str(released / "model.safetensors"))

    conv = [{"from": "human", "value": "<image>\nDescribe the picture."}]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    replies = []
    for folder in (full, released):
        model, tok = load_for_inference(folder)
        assert model.config.image_token_index == 32000 == model.vocab_size == len(tok)
        replies.append(answer_batch(model, tok, "v1", [conv], [[image]], max_new_tokens=6)[0])
    assert replies[0] == replies[1] and replies[0]
