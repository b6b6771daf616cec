"""Golden tests: our prompt builders give the official MIU-VL strings, for the paper's datasets, in every mode.

Facts relied on (MembrAI/MIU-VL at 80adbdb745dadabb0ca23785d567c10393b01388; code as of 8b556c6), as data:

* ``make_autopromptsv2.py``
  - mode "lama" (masked LM) questions, asked with ``--cls_names``, each wrapped in "[CLS] ... [SEP]":
    "The location of {cls_name} is at [MASK].", "The typical color of {cls_name} is [MASK].",
    "The typical shape of {cls_name} is [MASK]."; the top ``--topk`` (3) tokens of ``torch.topk`` are kept
    as they come; file ``j`` (top1/top2/top3) takes every attribute's ``j``-th token.
  - mode "lama" caption per class: prefix "{color} color, {shape} shape ", name ``--real_cls_names``, suffix
    " in {location}"; classes joined by ". "; keys written in the order caption, prefix, suffix, name.
  - mode "hybrid": the masked LM is asked "Only [MASK] cells have a {cls_name}." (location only); the VQA
    model (OFA-base) "What is the color of these {vqa_name}?" and "What is the shape of these {vqa_name}?",
    answers ``.strip()``-ed, the same for every rank; caption prefix "{color} ", name real name, suffix
    " in {location} cells" (shape asked, not used).
  - files written with ``json.dump`` to ``autoprompt_json/{mode}_{dataset}_path_prompt_top{k}.json``.
  - datasets (``DATASETMAP``): dfuc, isbi, cvc300, colondb, clinicdb, kvasir, warwick, bccd, cpm17.
* ``RUN/autoprompt/make_auto_mlm.sh``: kvasir, cls_names polyp, vqa_names wound, real_cls_names bump, lama.
  ``RUN/autoprompt/make_auto_hybrid.sh``: kvasir, cls_names polyp, vqa_names bump, real_cls_names bump.
* ``autoprompt_json/hybrid_{kvasir,clinicdb,colondb,cvc300}_path_prompt_top{1,2,3}.json`` (released; from an
  earlier hybrid version): per image {"caption": "pink round wound in rectum", "prefix": [""], "suffix":
  [" in rectum"], "name": ["pink round wound"]}: colour, shape, name in the grounded name; the suffix is
  " in rectum" / " in right" / " in fundus" in top1 / top2 / top3 for every image; the name is "wound" for
  kvasir and "bump" for the three CVC sets. One line, no final newline.
* ``configs/glip_Swin_T_O365_GoldG_polyp_kvasir.yaml`` (manual): DATASETS.CAPTION_PROMPT
  '[ {"prefix": "", "name": "pink yellow red color oval bump", "suffix": " in rectum"}, ]' (a Python literal).
* ``maskrcnn_benchmark/engine/inference_vqa.py`` ``create_prompt`` (VQA, polyp): "What is the color of the
  flesh bump?", "What is the shape of the flesh bump?", caption "{shape} shape of flesh bump in the rectum".
  ``inference_dfuc_vqa.py`` (DFUC 2020): "What is the color of this wound?", "What is the shape of this
  wound?", caption "{color} color, {shape} shape ulcer in foot". ``inference_isbi_vqa.py`` (ISIC 2016): classes
  "skin lesion", "melanoma"; "What is the color of the skin lesion?" (and of the melanoma; shape likewise),
  caption per class "{color} color, {shape} shape, {cls} in the skin" joined by ". ". These VQA functions
  take their positive map from the config prompt, not from these captions; ours grounds the class name.
  The inference grounds ``name`` (``tokens_positive`` = its characters) and asserts the caption equals
  prefix + name + suffix joined by ". ".
* BCCD classes (platelet, red blood cell, white blood cell) and its manual prompt: the paper's Table 4.

The masked-LM and VQA answers below are stand-ins (the official words need PubMedBERT and OFA); the released
files' own words are the answers where they are known.
"""

from __future__ import annotations

import json

import pytest
import torch

from mmr_medvlm.autoprompt import (
    HYBRID_CAPTION,
    HYBRID_MLM_TEMPLATES,
    MLM_CAPTION,
    RELEASED_HYBRID_CAPTION,
    CaptionTemplate,
    ClassNames,
    hybrid_prompt_set,
    hybrid_prompt_sets,
    mlm_knowledge,
    mlm_prompt_set,
    mlm_prompt_sets,
    vqa_prompt_set,
)
from mmr_medvlm.prompts import ClassPrompt, PromptSet, load_released_prompts, released_entry, save_released_prompts

# Class names per dataset: category -> names (caption / masked LM / VQA), from the run scripts and inference code.
KVASIR_MLM = {"polyp": ClassNames("bump", mlm="polyp", vqa="wound")}
KVASIR_HYBRID = {"polyp": ClassNames("bump", mlm="polyp", vqa="bump")}
ISIC = {"skin lesion": ClassNames("skin lesion"), "melanoma": ClassNames("melanoma")}
DFUC = {"ulcer": ClassNames("ulcer", vqa="wound")}
BCCD = {"platelet": ClassNames("platelet"), "rbc": ClassNames("red blood cell"), "wbc": ClassNames("white blood cell")}


class Asked:
    """A stand-in model answering only the exact questions it was given (any other question fails the test)."""

    def __init__(self, answers: dict) -> None:
        self.answers, self.questions = answers, []

    def mlm(self, text: str, k: int) -> list[str]:
        self.questions.append(text)
        return self.answers[text][:k]

    def vqa(self, image: object, question: str) -> str:
        assert image == "image.png"
        self.questions.append(question)
        return self.answers[question]


def _grounded(ps: PromptSet) -> list[str]:
    caption, spans = ps.caption_and_spans()
    return [caption[s:e] for (s, e), in spans]


# -- manual -----------------------------------------------------------------------------------------


def test_manual_bccd_table4():
    ps = PromptSet([ClassPrompt("platelet", shape="small", color="colorless"),
                    ClassPrompt("rbc", name="red blood cell", shape="rounded", color="freshcolor"),
                    ClassPrompt("wbc", name="white blood cell", shape="irregular", color="purple or blue")])
    assert ps.caption == ("small, colorless platelet. rounded, freshcolor red blood cell. "
                          "irregular, purple or blue white blood cell")
    assert _grounded(ps) == ["platelet", "red blood cell", "white blood cell"]


def test_manual_kvasir_caption_prompt_from_the_config():
    config_value = ('[\n\n\n\t\t{"prefix": "", "name": "pink yellow red color oval bump", "suffix": " in rectum"},'
                    '        ]')
    ps = PromptSet.from_caption_prompt(config_value, ["polyp"])
    assert ps.caption == "pink yellow red color oval bump in rectum"
    assert _grounded(ps) == ["pink yellow red color oval bump"]
    assert ps.classes[0].verbatim
    with pytest.raises(ValueError, match="1 entries for 2 categories"):
        PromptSet.from_caption_prompt(config_value, ["polyp", "adenoma"])


def test_caption_prompt_entries_are_verbatim():
    """GLIP concatenates prefix + name + suffix as written: no space or comma is added or removed."""
    ps = PromptSet.from_caption_prompt([{"prefix": "a ", "name": "x", "suffix": ""},
                                        {"prefix": "", "name": "y", "suffix": ",in z "}], ["x", "y"])
    assert ps.caption == "a x. y,in z "
    assert _grounded(ps) == ["x", "y"]
    with pytest.raises(ValueError, match="verbatim class prompt .* has attribute slots"):
        ClassPrompt("x", color="pink", verbatim=True)


# -- masked LM --------------------------------------------------------------------------------------

MLM_CASES = {
    "kvasir": (KVASIR_MLM, {
        "The typical color of polyp is [MASK].": ["pink", "red", "white"],
        "The typical shape of polyp is [MASK].": ["round", "flat", "oval"],
        "The location of polyp is at [MASK].": ["colon", "rectum", "stomach"],
    }, ["pink color, round shape bump in colon", "red color, flat shape bump in rectum",
        "white color, oval shape bump in stomach"], ["bump"]),
    "isic2016": (ISIC, {
        "The typical color of skin lesion is [MASK].": ["brown", "red", "pink"],
        "The typical shape of skin lesion is [MASK].": ["round", "oval", "flat"],
        "The location of skin lesion is at [MASK].": ["skin", "face", "back"],
        "The typical color of melanoma is [MASK].": ["black", "brown", "blue"],
        "The typical shape of melanoma is [MASK].": ["irregular", "round", "oval"],
        "The location of melanoma is at [MASK].": ["skin", "eye", "back"],
    }, ["brown color, round shape skin lesion in skin. black color, irregular shape melanoma in skin",
        "red color, oval shape skin lesion in face. brown color, round shape melanoma in eye",
        "pink color, flat shape skin lesion in back. blue color, oval shape melanoma in back"],
        ["skin lesion", "melanoma"]),
    "dfuc2020": (DFUC, {
        "The typical color of ulcer is [MASK].": ["red", "yellow", "black"],
        "The typical shape of ulcer is [MASK].": ["round", "oval", "irregular"],
        "The location of ulcer is at [MASK].": ["foot", "leg", "heel"],
    }, ["red color, round shape ulcer in foot", "yellow color, oval shape ulcer in leg",
        "black color, irregular shape ulcer in heel"], ["ulcer"]),
    "bccd": (BCCD, {
        "The typical color of platelet is [MASK].": ["colorless", "purple", "blue"],
        "The typical shape of platelet is [MASK].": ["small", "round", "oval"],
        "The location of platelet is at [MASK].": ["blood", "marrow", "spleen"],
        "The typical color of red blood cell is [MASK].": ["red", "pink", "dark"],
        "The typical shape of red blood cell is [MASK].": ["rounded", "round", "oval"],
        "The location of red blood cell is at [MASK].": ["blood", "vessels", "marrow"],
        "The typical color of white blood cell is [MASK].": ["purple", "blue", "white"],
        "The typical shape of white blood cell is [MASK].": ["irregular", "round", "large"],
        "The location of white blood cell is at [MASK].": ["blood", "marrow", "lymph"],
    }, ["colorless color, small shape platelet in blood. red color, rounded shape red blood cell in blood. "
        "purple color, irregular shape white blood cell in blood",
        "purple color, round shape platelet in marrow. pink color, round shape red blood cell in vessels. "
        "blue color, round shape white blood cell in marrow",
        "blue color, oval shape platelet in spleen. dark color, oval shape red blood cell in marrow. "
        "white color, large shape white blood cell in lymph"], ["platelet", "red blood cell", "white blood cell"]),
}


@pytest.mark.parametrize("dataset", MLM_CASES)
def test_mlm_prompts_per_rank(dataset):
    names, answers, captions, grounded = MLM_CASES[dataset]
    model = Asked(answers)
    sets = mlm_prompt_sets(names, model.mlm, top_k=3)
    assert sorted(model.questions) == sorted(answers)  # the official questions, each asked once
    assert [s.caption for s in sets] == captions
    assert all(_grounded(s) == grounded for s in sets)
    assert [s.classes[0].name for s in sets] == [grounded[0]] * 3
    # One rank at a time gives the same set; the default (top_k=1) is the top-1 file.
    assert mlm_prompt_set(names, Asked(answers).mlm, top_k=3, rank=2).caption == captions[2]
    assert mlm_prompt_set(names, Asked(answers).mlm).caption == captions[0]


def test_mlm_sets_in_the_official_file_format(tmp_path):
    """Mode "lama" writes every image the same entry per rank, keys caption, prefix, suffix, name."""
    sets = mlm_prompt_sets(KVASIR_MLM, Asked(MLM_CASES["kvasir"][1]).mlm, top_k=3)
    path = save_released_prompts({"DATA/POLYP/val/Kvasir/images/a.png": sets[1]}, tmp_path / "lama.json")
    assert path.read_text() == (
        '{"DATA/POLYP/val/Kvasir/images/a.png": {"caption": "red color, flat shape bump in rectum", '
        '"prefix": ["red color, flat shape "], "suffix": [" in rectum"], "name": ["bump"]}}')
    back = load_released_prompts(path, ["polyp"])["DATA/POLYP/val/Kvasir/images/a.png"]
    assert back.caption == sets[1].caption and _grounded(back) == ["bump"]


def test_mlm_questions_tokenize_like_the_official_cls_sep_text(tmp_path):
    """The official text carries literal "[CLS]"/"[SEP]" and is tokenized with ``tokenize`` (no specials added);
    ours adds them: the ids agree, so the masked LM sees the same input, and the raw top-k is ``torch.topk``."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from mmr_medvlm.autoprompt import MLM_TEMPLATES, hf_masked_lm_predictor

    words = ("[PAD] [UNK] [CLS] [SEP] [MASK] . , the typical color shape location of is at only cells have a "
             "polyp bump wound skin lesion melanoma ulcer platelet red white blood cell pink round ##s").split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"), do_lower_case=True)
    for template in [*MLM_TEMPLATES.values(), "Only {mask} cells have a {object}."]:
        for obj in ("polyp", "skin lesion", "red blood cell"):
            ours = tok(template.format(object=obj, mask="[MASK]"))["input_ids"]
            official = tok.convert_tokens_to_ids(tok.tokenize(f"[CLS] {template.format(object=obj, mask='[MASK]')} [SEP]"))
            assert ours == official
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)).eval()
    raw = hf_masked_lm_predictor(model, tok, whole_words=False)
    text = "The typical color of polyp is [MASK]."
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0]
    at = tok(text)["input_ids"].index(tok.mask_token_id)
    assert raw(text, 3) == tok.convert_ids_to_tokens(torch.topk(logits[at], 3).indices.tolist())


def test_mlm_knowledge_and_template_errors():
    model = Asked(MLM_CASES["kvasir"][1])
    knowledge = mlm_knowledge(KVASIR_MLM, model.mlm, top_k=3)
    assert knowledge == {"polyp": {"color": ["pink", "red", "white"], "shape": ["round", "flat", "oval"],
                                   "location": ["colon", "rectum", "stomach"]}}
    with pytest.raises(ValueError, match="gave 1 words for the color of 'polyp'"):
        mlm_knowledge(KVASIR_MLM, lambda text, k: ["pink"], top_k=3)
    with pytest.raises(KeyError, match=r"needs \['location'\] for category 'polyp'"):
        mlm_prompt_set(KVASIR_MLM, model.mlm, attributes=("color", "shape"))
    assert MLM_CAPTION.attributes == ("color", "shape", "location")


# -- VQA --------------------------------------------------------------------------------------------

THE = {"color": "What is the color of the {object}?", "shape": "What is the shape of the {object}?"}
THIS = {"color": "What is the color of this {object}?", "shape": "What is the shape of this {object}?"}
VQA_CASES = {
    "polyp": ({"polyp": ClassNames("flesh bump")}, THE,
              CaptionTemplate(prefix="{shape} shape of ", suffix=" in the rectum"),
              {"What is the color of the flesh bump?": "pink", "What is the shape of the flesh bump?": " round "},
              "round shape of flesh bump in the rectum", ["flesh bump"]),
    "dfuc2020": (DFUC, THIS, CaptionTemplate(prefix="{color} color, {shape} shape ", suffix=" in foot"),
                 {"What is the color of this wound?": "red", "What is the shape of this wound?": "round"},
                 "red color, round shape ulcer in foot", ["ulcer"]),
    "isic2016": (ISIC, THE, CaptionTemplate(prefix="{color} color, {shape} shape, ", suffix=" in the skin"),
                 {"What is the color of the skin lesion?": "brown", "What is the shape of the skin lesion?": "round",
                  "What is the color of the melanoma?": "black", "What is the shape of the melanoma?": "oval"},
                 "brown color, round shape, skin lesion in the skin. black color, oval shape, melanoma in the skin",
                 ["skin lesion", "melanoma"]),
    "bccd": (BCCD, None, None,
             {"What is the color of these platelet?": "purple", "What is the shape of these platelet?": "round",
              "What is the color of these red blood cell?": "red",
              "What is the shape of these red blood cell?": "circle",
              "What is the color of these white blood cell?": "purple and blue",
              "What is the shape of these white blood cell?": "round"},
             "purple color, round shape platelet. red color, circle shape red blood cell. "
             "purple and blue color, round shape white blood cell", ["platelet", "red blood cell", "white blood cell"]),
}


@pytest.mark.parametrize("dataset", VQA_CASES)
def test_vqa_prompts(dataset):
    names, questions, caption, answers, expected, grounded = VQA_CASES[dataset]
    model = Asked(answers)
    kwargs = {k: v for k, v in (("questions", questions), ("caption", caption)) if v is not None}
    ps = vqa_prompt_set("image.png", names, model.vqa, **kwargs)
    assert sorted(model.questions) == sorted(answers)
    assert ps.caption == expected
    assert _grounded(ps) == grounded


# -- hybrid -----------------------------------------------------------------------------------------

HYBRID_CASES = {
    "kvasir": (KVASIR_HYBRID, {"Only [MASK] cells have a polyp.": ["epithelial", "colon", "goblet"]},
               {"What is the color of these bump?": "pink", "What is the shape of these bump?": "round"},
               ["pink bump in epithelial cells", "pink bump in colon cells", "pink bump in goblet cells"], ["bump"]),
    "isic2016": (ISIC, {"Only [MASK] cells have a skin lesion.": ["skin", "epithelial", "basal"],
                        "Only [MASK] cells have a melanoma.": ["pigment", "tumor", "skin"]},
                 {"What is the color of these skin lesion?": "brown", "What is the shape of these skin lesion?": "round",
                  "What is the color of these melanoma?": "black", "What is the shape of these melanoma?": "oval"},
                 ["brown skin lesion in skin cells. black melanoma in pigment cells",
                  "brown skin lesion in epithelial cells. black melanoma in tumor cells",
                  "brown skin lesion in basal cells. black melanoma in skin cells"], ["skin lesion", "melanoma"]),
    "dfuc2020": (DFUC, {"Only [MASK] cells have a ulcer.": ["skin", "epithelial", "stem"]},
                 {"What is the color of these wound?": "red", "What is the shape of these wound?": "round"},
                 ["red ulcer in skin cells", "red ulcer in epithelial cells", "red ulcer in stem cells"], ["ulcer"]),
    "bccd": (BCCD, {"Only [MASK] cells have a platelet.": ["blood", "megakaryocyte", "stem"],
                    "Only [MASK] cells have a red blood cell.": ["blood", "red", "stem"],
                    "Only [MASK] cells have a white blood cell.": ["blood", "immune", "stem"]},
             {"What is the color of these platelet?": "purple", "What is the shape of these platelet?": "round",
              "What is the color of these red blood cell?": "red", "What is the shape of these red blood cell?": "round",
              "What is the color of these white blood cell?": "blue",
              "What is the shape of these white blood cell?": "round"},
             ["purple platelet in blood cells. red red blood cell in blood cells. blue white blood cell in blood cells",
              "purple platelet in megakaryocyte cells. red red blood cell in red cells. "
              "blue white blood cell in immune cells",
              "purple platelet in stem cells. red red blood cell in stem cells. blue white blood cell in stem cells"],
             ["platelet", "red blood cell", "white blood cell"]),
}


@pytest.mark.parametrize("dataset", HYBRID_CASES)
def test_hybrid_prompts_per_rank(dataset):
    names, mlm_answers, vqa_answers, captions, grounded = HYBRID_CASES[dataset]
    mlm, vqa = Asked(mlm_answers), Asked(vqa_answers)
    knowledge = mlm_knowledge(names, mlm.mlm, top_k=3, templates=HYBRID_MLM_TEMPLATES)
    sets = hybrid_prompt_sets("image.png", names, vqa.vqa, knowledge, top_k=3)
    assert sorted(mlm.questions) == sorted(mlm_answers)
    assert sorted(vqa.questions) == sorted(vqa_answers)  # each asked once per image, as officially
    assert [s.caption for s in sets] == captions
    assert all(_grounded(s) == grounded for s in sets)
    assert HYBRID_CAPTION.attributes == ("color", "location")  # shape is asked, not written
    one = hybrid_prompt_set("image.png", names, Asked(vqa_answers).vqa, Asked(mlm_answers).mlm)
    assert one.caption == captions[0]
    assert hybrid_prompt_set("image.png", names, Asked(vqa_answers).vqa, None, top_k=3, rank=1,
                             knowledge=knowledge).caption == captions[1]


# -- the released files -----------------------------------------------------------------------------

# The first two images of each file, as the files hold them.
RELEASED = {
    ("kvasir", 1): {"DATA/POLYP/val/Kvasir/images/cju2omjpeqj5a0988pjdlb8l1.png": ("pink", "round"),
                    "DATA/POLYP/val/Kvasir/images/cju3ykamdj9u208503pygyuc8.png": ("white", "triangle")},
    ("kvasir", 2): {"DATA/POLYP/val/Kvasir/images/cju2omjpeqj5a0988pjdlb8l1.png": ("pink", "round"),
                    "DATA/POLYP/val/Kvasir/images/cju3ykamdj9u208503pygyuc8.png": ("white", "triangle")},
    ("kvasir", 3): {"DATA/POLYP/val/Kvasir/images/cju2omjpeqj5a0988pjdlb8l1.png": ("pink", "round"),
                    "DATA/POLYP/val/Kvasir/images/cju3ykamdj9u208503pygyuc8.png": ("white", "triangle")},
    ("clinicdb", 1): {"DATA/POLYP/val/CVC-ClinicDB/images/300.png": ("white", "round"),
                      "DATA/POLYP/val/CVC-ClinicDB/images/154.png": ("white", "triangle")},
    ("colondb", 2): {"DATA/POLYP/val/CVC-ColonDB/images/300.png": ("yellow", "oval"),
                     "DATA/POLYP/val/CVC-ColonDB/images/259.png": ("orange", "square")},
    ("cvc300", 3): {"DATA/POLYP/val/CVC-300/images/154.png": ("white", "round"),
                    "DATA/POLYP/val/CVC-300/images/194.png": ("white", "round")},
}
RELEASED_LOCATIONS = ["rectum", "right", "fundus"]  # top1, top2, top3
KVASIR_TOP1_HEAD = (
    '{"DATA/POLYP/val/Kvasir/images/cju2omjpeqj5a0988pjdlb8l1.png": {"caption": "pink round wound in rectum", '
    '"prefix": [""], "suffix": [" in rectum"], "name": ["pink round wound"]}, '
    '"DATA/POLYP/val/Kvasir/images/cju3ykamdj9u208503pygyuc8.png": {"caption": "white triangle wound in rectum", '
    '"prefix": [""], "suffix": [" in rectum"], "name": ["white triangle wound"]}}'
)


@pytest.mark.parametrize("dataset,top", list(RELEASED))
def test_released_hybrid_files(dataset, top):
    """RELEASED_HYBRID_CAPTION with the files' colour and shape (VQA) and rank-``top`` location (masked LM) gives
    their entries; span="phrase" on attribute slots gives the same caption and grounded span."""
    name = "wound" if dataset == "kvasir" else "bump"
    location = RELEASED_LOCATIONS[top - 1]
    for image, (color, shape) in RELEASED[dataset, top].items():
        ps = hybrid_prompt_set(image, {"polyp": name}, None, None, top_k=3, rank=top - 1,
                               caption=RELEASED_HYBRID_CAPTION,
                               knowledge={"polyp": {"location": RELEASED_LOCATIONS}},
                               answers={"polyp": {"color": color, "shape": shape}})
        expected = {"caption": f"{color} {shape} {name} in {location}", "prefix": [""],
                    "suffix": [f" in {location}"], "name": [f"{color} {shape} {name}"]}
        assert released_entry(ps) == expected
        assert list(released_entry(ps)) == ["caption", "prefix", "suffix", "name"]
        phrase = PromptSet([ClassPrompt("polyp", name=name, color=color, shape=shape, location=f"in {location}")],
                           span="phrase")
        assert released_entry(phrase) == expected


def test_released_file_reads_and_writes_byte_for_byte(tmp_path, tokenizer):
    src = tmp_path / "hybrid_kvasir_path_prompt_top1.json"
    src.write_text(KVASIR_TOP1_HEAD)
    prompts = load_released_prompts(src, ["polyp"])
    first = prompts["DATA/POLYP/val/Kvasir/images/cju2omjpeqj5a0988pjdlb8l1.png"]
    assert first.caption == "pink round wound in rectum" and _grounded(first) == ["pink round wound"]
    enc = first.encode(tokenizer, max_length=16)
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids.tolist())
    assert [tokens[i] for i in enc.label_to_tokens()[0]] == ["pink", "round", "[UNK]"]  # "wound" is not in the vocab
    out = save_released_prompts(prompts, tmp_path / "out.json")
    assert out.read_bytes() == src.read_bytes()


def test_released_file_errors_name_the_image(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a.png": {"caption": "pink round wound in colon", "prefix": [""],
                                         "suffix": [" in rectum"], "name": ["pink round wound"]}}))
    with pytest.raises(ValueError, match=r"bad.json: image 'a.png': caption 'pink round wound in colon'"):
        load_released_prompts(bad, ["polyp"])
    bad.write_text(json.dumps({"a.png": {"caption": "x", "name": ["x"]}}))
    with pytest.raises(ValueError, match=r"image 'a.png': 'name' must be a list of 2 strings"):
        load_released_prompts(bad, ["polyp", "adenoma"])
    bad.write_text(json.dumps({"a.png": {"name": ["x"]}}))
    with pytest.raises(ValueError, match=r"image 'a.png' needs 'caption' and 'name'"):
        load_released_prompts(bad, ["polyp"])


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_verbatim_sets_save_and_load(tmp_path, suffix):
    """Auto-prompt sets keep their exact spacing through our reviewable files."""
    ps = mlm_prompt_sets(KVASIR_MLM, Asked(MLM_CASES["kvasir"][1]).mlm, top_k=3)[1]
    loaded = PromptSet.load(ps.save(tmp_path / f"p{suffix}"))
    assert loaded.caption == "red color, flat shape bump in rectum" and loaded.classes == ps.classes
    plain = PromptSet([ClassPrompt("platelet", color="colorless")]).to_dict()
    assert "verbatim" not in plain["classes"][0]  # files of ordinary prompts are unchanged
