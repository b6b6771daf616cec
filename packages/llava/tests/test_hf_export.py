"""Our HF-layout export, read by transformers alone: what vLLM / SGLang-style servers rely on.

Such servers load a llava folder through transformers' own classes: ``LlavaForConditionalGeneration`` for the
weights and config, ``AutoProcessor`` (a ``LlavaProcessor``: tokenizer + image processor) to turn a prompt
with ``<image>`` into the model's input ids, one image token per patch, and pixels. The test trains a tiny
run, exports it with ``mmr-llava convert --to hf`` as a user would, and checks that transformers, given only
that folder, builds the same prompt ids, the same pixels and the same logits as mmr_llava does.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from PIL import Image

from mmr_llava.cli import main as cli_main
from mmr_llava.conversation import render, tokenize_with_labels
from mmr_llava.data import preprocess_image
from mmr_llava.inference import image_token_id, load_for_inference
from mmr_llava.miniature.scenes import write_dataset
from mmr_llava.model import LlavaModel
from mmr_llava.train import TrainConfig, train

CONVERSATION = [{"from": "human", "value": "<image>\nWhat color is the largest shape?"}]


def _as_transformers_tokenizes(ids: list[int], tok, image_id: int) -> list[int]:
    """Our prompt ids (the original LLaVA's ``tokenizer_image_token``) as the processor writes the same prompt.

    Two known differences, both of the original against llava-hf and not of the export: the original tokenizes
    the text on each side of ``<image>`` on its own, so the chunk after the image starts with SentencePiece's
    bare prefix piece ``"▁"`` (LLaMA's id 29871), which a whole-prompt tokenization does not write; and it
    always keeps the first chunk's BOS, which the processor writes only where the tokenizer adds one (LLaMA's
    does; the tiny run's BPE tokenizer does not).
    """
    ids = list(ids)
    if tok("a")["input_ids"][:1] != [tok.bos_token_id] and ids[:1] == [tok.bos_token_id]:
        ids = ids[1:]
    after = max(i for i, t in enumerate(ids) if t == image_id) + 1
    if tok.convert_ids_to_tokens(ids[after]) == "\u2581":
        del ids[after]
    return ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trained run (1 step; its own small tokenizer with ``<image>``) and its HF-layout export."""
    os.environ["MMR_NO_PROGRESS"] = "1"
    root = tmp_path_factory.mktemp("hf_export")
    paths = write_dataset(root / "data", n_scenes=4, seed=5)
    train(TrainConfig(model="tiny", data=str(paths["instruct"]), image_folder=str(root / "data"),
                      output_dir=str(root / "run"), micro_batch_size=4, max_steps=1, tokenizer_vocab=200))
    cli_main(["convert", str(root / "run" / "model"), str(root / "hf"), "--to", "hf"])
    image = Image.open(sorted((root / "data" / "images").glob("*.png"))[0]).convert("RGB")
    return root, image


def test_the_folder_holds_what_a_server_loads(exported):
    root, _ = exported
    names = {p.name for p in (root / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names, names
    config = transformers.AutoConfig.from_pretrained(root / "hf")
    assert config.model_type == "llava" and config.architectures == ["LlavaForConditionalGeneration"]
    assert isinstance(transformers.AutoProcessor.from_pretrained(root / "hf"), transformers.LlavaProcessor)


def test_transformers_processor_and_model_give_our_ids_pixels_and_logits(exported):
    root, image = exported
    folder = root / "hf"
    processor = transformers.LlavaProcessor.from_pretrained(folder)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    ours = LlavaModel.from_pretrained(folder, attn_implementation="eager").eval()
    _, tok = load_for_inference(folder)
    cfg = ours.config

    # The prompt as our chat renders it (Vicuna v1 template, generation prompt), through their processor.
    prompt, _ = render("v1", CONVERSATION, add_generation_prompt=True)
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    our_ids = tokenize_with_labels(tok, "v1", CONVERSATION, image_token_id=image_token_id(tok, ours),
                                   num_patches=cfg.num_patches, add_generation_prompt=True)["input_ids"]
    assert inputs["input_ids"][0].tolist() == _as_transformers_tokenizes(our_ids, tok, cfg.image_token_index)
    assert (inputs["input_ids"] == theirs.config.image_token_index).sum() == cfg.num_patches

    # Same PIL resize/pad/crop on both sides; only the float32 normalise may round in another order
    # (values within +-2.2 after normalising, so <= 2 ulp = 5e-7): 1e-6.
    our_pixels = preprocess_image(image, cfg.image_size, cfg.image_aspect_ratio)
    torch.testing.assert_close(inputs["pixel_values"][0], our_pixels, rtol=0, atol=1e-6)

    # Same float32 modules, same weights, same inputs (their pixels), eager attention on both sides; they differ
    # only where a kernel orders a reduction differently: dot products of at most 128 terms of unit scale,
    # worst-case rounding about 128 * 2**-24 ~ 8e-6 of the logits' scale (|logits| ~ 1 here): 1e-5 holds it.
    with torch.no_grad():
        their_logits = theirs(**inputs).logits
        our_logits = ours(inputs["input_ids"], inputs["pixel_values"])["logits"]
    assert their_logits.abs().max() < 10  # the scale the bound above assumes
    torch.testing.assert_close(our_logits, their_logits, rtol=0, atol=1e-5)


def test_processor_config_counts_patches_for_any_tower(exported):
    """The processor's count of image tokens follows the config (patch side, CLIP's class token dropped)."""
    root, _ = exported
    saved = json.loads((root / "hf" / "processor_config.json").read_text())
    cfg = LlavaModel.from_pretrained(root / "hf").config
    side, patch = cfg.image_size, saved["patch_size"]
    assert (side // patch) ** 2 + saved["num_additional_image_tokens"] - 1 == cfg.num_patches
