"""Golden tests of prompt rendering and the name-span -> token map (GLIP's tokens_positive)."""

from __future__ import annotations

import pytest
import torch

from mmr_medvlm.autoprompt import hybrid_prompt_set, mlm_prompt_set, vqa_prompt_set
from mmr_medvlm.prompts import ClassPrompt, PromptSet, PromptTooLongError, load_prompt_sets, save_prompt_sets


def _paper_combination() -> PromptSet:
    return PromptSet(
        [
            ClassPrompt("platelet", shape="small", color="colorless"),
            ClassPrompt("rbc", name="red blood cell", shape="rounded", color="freshcolor"),
            ClassPrompt("wbc", name="white blood cell", shape="irregular", color="purple or blue"),
        ],
        name="combination",
    )


def _glip_char_to_token_map(enc, spans, n_tokens):
    """GLIP's create_positive_map, written independently with char_to_token (the golden reference)."""
    out = torch.zeros(len(spans), n_tokens, dtype=torch.bool)
    for j, tok_list in enumerate(spans):
        for beg, end in tok_list:
            b = enc.char_to_token(beg)
            e = enc.char_to_token(end - 1)
            out[j, b:e + 1] = True
    return out


def test_paper_prompt_renders_exactly():
    ps = _paper_combination()
    assert ps.caption == (
        "small, colorless platelet. rounded, freshcolor red blood cell. irregular, purple or blue white blood cell"
    )
    _, spans = ps.caption_and_spans()
    assert [ps.caption[s:e] for (s, e), in spans] == ["platelet", "red blood cell", "white blood cell"]
    assert spans[0] == [(17, 25)]


def test_location_suffix_and_names_only():
    ps = PromptSet([ClassPrompt("platelet", location="in blood"), ClassPrompt("rbc", name="red blood cell",
                                                                             location="in blood")])
    assert ps.caption == "platelet in blood. red blood cell in blood"
    assert PromptSet.from_names(["platelet", "red blood cell"]).caption == "platelet. red blood cell"


def test_tokens_positive_golden(tokenizer):
    enc = _paper_combination().encode(tokenizer, max_length=32)
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids[: int(enc.attention_mask.sum())].tolist())
    assert tokens[:13] == ["[CLS]", "small", ",", "colorless", "platelet", ".", "rounded", ",", "fresh", "##color",
                           "red", "blood", "cell"]
    assert enc.label_to_tokens() == {0: [4], 1: [10, 11, 12], 2: [19, 20, 21]}
    assert enc.positive_map.shape == (3, 32) and enc.input_ids.shape == (32,)
    assert int(enc.attention_mask.sum()) == 23


def test_wordpiece_names_match_glip_char_to_token(tokenizer):
    ps = PromptSet([
        ClassPrompt("platelet", name="thrombocyte", prefix="small"),
        ClassPrompt("rbc", name="erythrocyte", color="red"),
        ClassPrompt("wbc", name="leukocytes", location="in blood"),
    ])
    enc = ps.encode(tokenizer, max_length=40)
    full = tokenizer(enc.caption)
    n = len(full["input_ids"])
    ref = _glip_char_to_token_map(full, enc.tokens_positive, n)
    assert torch.equal(enc.positive_map[:, :n], ref)
    assert enc.label_to_tokens()[0] == [2, 3]  # thrombo ##cyte
    assert len(enc.label_to_tokens()[2]) == 3  # leuko ##cyte ##s


def test_prompt_too_long_names_the_cut_classes(tokenizer):
    ps = _paper_combination()
    with pytest.raises(PromptTooLongError, match=r"23 tokens.*\['wbc'\]"):
        ps.encode(tokenizer, max_length=20)


def test_missing_category_is_an_error():
    with pytest.raises(KeyError, match="no entry for dataset categories \\['neutrophil'\\]"):
        _paper_combination().for_categories(["wbc", "neutrophil"])
    assert _paper_combination().for_categories(["wbc", "rbc", "platelet"]).categories == ["wbc", "rbc", "platelet"]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_load_roundtrip(tmp_path, suffix):
    sets = [PromptSet.from_names({"platelet": "platelet", "rbc": "red blood cell"}, name="names"),
            _paper_combination()]
    path = save_prompt_sets(sets, tmp_path / f"bccd{suffix}")
    text = path.read_text()
    assert "small, colorless platelet" in text  # the rendered caption is there for a reviewer
    loaded = load_prompt_sets(path)
    assert [s.caption for s in loaded] == [s.caption for s in sets]
    one = sets[1].save(tmp_path / f"one{suffix}")
    assert PromptSet.load(one).classes == sets[1].classes


def test_edited_caption_without_classes_is_rejected(tmp_path):
    data = _paper_combination().to_dict()
    data["caption"] = "something else"
    with pytest.raises(ValueError, match="disagrees with its classes"):
        PromptSet.from_dict(data)


def test_mlm_assembly_with_deterministic_fake():
    """The official questions and caption form; top-k joined with " or " into the slots with caption=None."""
    asked = []
    answers = {"color": ["purple", "blue"], "shape": ["irregular", "round"], "location": ["blood", "marrow"]}

    def fake(text: str, k: int) -> list[str]:
        asked.append(text)
        attr = "location" if "location" in text else text.split()[2]
        return answers[attr][:k] if "white" in text else ["x", "y"][:k]

    ps = mlm_prompt_set({"wbc": "white blood cell", "rbc": "red blood cell"}, fake, top_k=2, rank=1)
    assert "The typical color of white blood cell is [MASK]." in asked
    assert "The location of white blood cell is at [MASK]." in asked
    assert ps.caption == "blue color, round shape white blood cell in marrow. y color, y shape red blood cell in y"
    assert ps.meta["answers"]["wbc"]["color"] == ["purple", "blue"]
    slots = mlm_prompt_set({"wbc": "white blood cell"}, fake, top_k=2, caption=None)
    assert slots.caption == "irregular or round, purple or blue white blood cell in blood or marrow"
    with pytest.raises(ValueError, match="rank 2 is outside the 2 answers"):
        mlm_prompt_set({"wbc": "white blood cell"}, fake, top_k=2, rank=2)


def test_mlm_with_tiny_random_bert(tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    from mmr_medvlm.autoprompt import hf_masked_lm_predictor

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    model = BertForMaskedLM(cfg).eval()
    pred = hf_masked_lm_predictor(model, tokenizer)
    words = pred("The color of platelet is [MASK].", 3)
    assert len(words) == 3
    assert all(not w.startswith("##") and w not in ("the", "of", "is") and w in tokenizer.vocab for w in words)
    ps = mlm_prompt_set({"platelet": "platelet"}, pred, attributes=("color",), top_k=2, caption=None)
    assert ps.classes[0].color == " or ".join(pred("The typical color of platelet is [MASK].", 2))
    ps.encode(tokenizer, max_length=32)  # an assembled auto-prompt tokenizes and maps


def test_vqa_and_hybrid():
    def vqa(image, question):
        assert image == "img0"
        return {"What is the color of these white blood cell?": " purple ",
                "What is the shape of these white blood cell?": "round"}.get(question, "")

    v = vqa_prompt_set("img0", {"wbc": "white blood cell"}, vqa)
    assert v.caption == "purple color, round shape white blood cell"
    assert vqa_prompt_set("img0", {"wbc": "white blood cell"}, vqa, caption=None).caption == (
        "round, purple white blood cell")
    h = hybrid_prompt_set("img0", {"wbc": "white blood cell"}, vqa, None, knowledge={"wbc": {"location": ["bone"]}})
    assert h.caption == "purple white blood cell in bone cells"
    _, spans = h.caption_and_spans()
    assert [h.caption[s:e] for (s, e), in spans] == ["white blood cell"]


def test_phrase_span_grounds_attributes_like_the_paper_files(tokenizer, tmp_path):
    """span="phrase": colour and shape sit inside the grounded span, colour first ("pink round wound" in the
    paper's files), space-joined; the location stays outside it."""
    ps = PromptSet([ClassPrompt("platelet", shape="small", color="colorless", location="in blood"),
                    ClassPrompt("rbc", name="red blood cell")], span="phrase")
    assert ps.caption == "colorless small platelet in blood. red blood cell"
    _, spans = ps.caption_and_spans()
    assert [ps.caption[s:e] for (s, e), in spans] == ["colorless small platelet", "red blood cell"]
    enc = ps.encode(tokenizer, max_length=16)
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids.tolist())
    assert [[tokens[i] for i in t] for t in enc.label_to_tokens().values()] == [
        ["colorless", "small", "platelet"], ["red", "blood", "cell"]]
    loaded = PromptSet.load(ps.save(tmp_path / "p.yaml"))
    assert loaded.span == "phrase" and loaded.caption == ps.caption
    with pytest.raises(ValueError, match="span 'words'"):
        PromptSet(ps.classes, span="words")


def test_vqa_prompts_with_a_tiny_random_vilt(tokenizer):
    """VQA auto-prompts from a real transformers VQA model (ViLT answer classifier, tiny random config): each
    answer is one of the model's answer labels and lands in the class's attribute slot."""
    import numpy as np
    from PIL import Image
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    from mmr_medvlm.autoprompt import hf_vqa_model

    answers = ["purple", "round", "blue or purple", "irregular"]
    torch.manual_seed(0)
    cfg = ViltConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, image_size=64, patch_size=32, max_position_embeddings=40,
                     num_labels=len(answers), id2label=dict(enumerate(answers)),
                     label2id={a: i for i, a in enumerate(answers)})
    model = ViltForQuestionAnswering(cfg).eval()
    proc = ViltProcessor(image_processor=ViltImageProcessor(size={"shortest_edge": 64}, size_divisor=32),
                         tokenizer=tokenizer)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    ask = hf_vqa_model(model, proc)
    assert ask(image, "what is the color of these white blood cell?") in answers
    ps = vqa_prompt_set(image, {"wbc": "white blood cell", "platelet": "platelet"}, ask)
    raw = ps.meta["answers"]
    assert set(raw) == {"wbc", "platelet"} and all(a in answers for r in raw.values() for a in r.values())
    wbc = raw["wbc"]
    assert ps.caption.startswith(f"{wbc['color']} color, {wbc['shape']} shape white blood cell. ")
    assert ps.classes[0].name == "white blood cell"
