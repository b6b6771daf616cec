"""Exact template strings and golden loss masks on a real LLaMA tokenizer."""

import copy

import pytest

from mmr_llava import conversation as conv

CONV = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A red cube next to a blue ball."},
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "There are 2 objects."},
]
ANSWERS = ["A red cube next to a blue ball.", "There are 2 objects."]

EXPECTED_TEXT = {
    "plain": "<image>A red cube next to a blue ball.\n",
    "v0": ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
           "helpful, detailed, and polite answers to the human's questions.###Human: <image>\nWhat is in the "
           "picture?###Assistant: A red cube next to a blue ball.###Human: How many objects are there?###"
           "Assistant: There are 2 objects.###"),
    "v1": ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
           "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the "
           "picture? ASSISTANT: A red cube next to a blue ball.</s>USER: How many objects are there? "
           "ASSISTANT: There are 2 objects.</s>"),
    "llama_2": ("[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand "
                "the visual content that the user provides, and assist the user with a variety of tasks using "
                "natural language.\n<</SYS>>\n\n<image>\nWhat is in the picture? [/INST] A red cube next to a "
                "blue ball. </s><s>[INST] How many objects are there? [/INST] There are 2 objects. </s>"),
    "chatml": ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant "
               "gives helpful and honest answers.<|im_end|><|im_start|>user\n<image>\nWhat is in the picture?"
               "<|im_end|><|im_start|>assistant\nA red cube next to a blue ball.<|im_end|><|im_start|>user\n"
               "How many objects are there?<|im_end|><|im_start|>assistant\nThere are 2 objects.<|im_end|>"),
}
EOT = {"plain": "\n", "v0": "###", "v1": "</s>", "llama_2": " </s>", "chatml": "<|im_end|>"}


@pytest.mark.parametrize("name", sorted(conv.TEMPLATES))
def test_rendered_strings_are_exact(name):
    messages = CONV[:2] if name == "plain" else CONV
    text, spans = conv.render(name, messages)
    assert text == EXPECTED_TEXT[name]
    answers = ANSWERS[:1] if name == "plain" else ANSWERS
    assert [text[a:b] for a, b in spans] == [ans + EOT[name] for ans in answers]


def test_generation_prompts():
    assert conv.render("v1", CONV[:1], add_generation_prompt=True)[0].endswith("picture? ASSISTANT:")
    assert conv.render("v0", CONV[:1], add_generation_prompt=True)[0].endswith("picture?###Assistant:")
    assert conv.render("chatml", CONV[:1], add_generation_prompt=True)[0].endswith("<|im_start|>assistant\n")
    assert conv.render("llama_2", CONV[:1], add_generation_prompt=True)[0].endswith("picture? [/INST]")
    with pytest.raises(ValueError, match="ends with a user turn"):
        conv.render("v1", CONV[:2], add_generation_prompt=True)


def _squash(s):
    return "".join(s.split())


@pytest.mark.parametrize("name", sorted(conv.TEMPLATES))
def test_golden_masks_on_llama_tokenizer(llama_tokenizer, name):
    tok = copy.deepcopy(llama_tokenizer)
    image_id = conv.prepare_tokenizer(tok, name)
    messages = CONV[:2] if name == "plain" else CONV
    out = conv.tokenize_with_labels(tok, name, messages, image_token_id=image_id, num_patches=4)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    assert ids.count(image_id) == 4 and all(lab == -100 for i, lab in zip(ids, labels) if i == image_id)
    if conv.get_template(name).add_bos:
        assert ids[0] == tok.bos_token_id and labels[0] == -100
    # Group supervised tokens into contiguous runs: one run per answer, decoding to answer + end-of-turn.
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    answers = ANSWERS[:1] if name == "plain" else ANSWERS
    decoded = [tok.decode(r) for r in runs]
    assert [_squash(d) for d in decoded] == [_squash(a + EOT[name]) for a in answers], decoded
    # The prompt part never contains answer text, the whole sequence decodes back to the rendered text.
    unsupervised = tok.decode([i for i, lab in zip(ids, labels) if lab == -100 and i != image_id])
    assert all(a not in unsupervised for a in answers)
    eot_id = tok.convert_tokens_to_ids(EOT[name].strip()) if name in ("v1", "llama_2", "chatml") else None
    if eot_id is not None:
        assert [r[-1] for r in runs] == [eot_id] * len(answers)


def test_mismatch_is_an_error_or_a_counted_warning(llama_tokenizer):
    # Roles chosen so that the answer "hel" and the next turn "lo: ..." merge into one token "▁hello".
    bad = conv.Template("bad", "two", "sys", roles=("lo", "ASSISTANT"), sep=" ", sep2="")
    messages = [("user", "hi"), ("assistant", "hel"), ("user", "x"), ("assistant", "y")]
    with pytest.raises(conv.TokenizationMismatch, match="crosses the end"):
        conv.tokenize_with_labels(llama_tokenizer, bad, messages)
    before = conv.MISMATCHES.count
    with pytest.warns(UserWarning, match="tokenization mismatch"):
        out = conv.tokenize_with_labels(llama_tokenizer, bad, messages, on_mismatch="warn")
    assert conv.MISMATCHES.count == before + 1
    assert any(lab != -100 for lab in out["labels"])  # the sample is kept, not silently blanked


def test_bad_conversations_are_named():
    with pytest.raises(ValueError, match="turn 1"):
        conv.render("v1", [("user", "a"), ("user", "b")])
    with pytest.raises(ValueError, match="unknown speaker"):
        conv.render("v1", [("robot", "a")])
    with pytest.raises(KeyError, match="unknown conversation template"):
        conv.get_template("vicuna")


@pytest.mark.parametrize("answer", ["Yes, it is.", "12 shapes."])
@pytest.mark.parametrize("name", sorted(conv.TEMPLATES))
def test_everything_generated_after_the_generation_prompt_is_supervised(llama_tokenizer, name, answer):
    # Training must teach exactly what generation asks for: the generation prompt is a prefix of the
    # training sequence and every token after it is supervised, including a lone "▁" that LLaMA puts
    # before digits (v1 prompts stop at "ASSISTANT:", so the model has to emit that space itself).
    tok = copy.deepcopy(llama_tokenizer)
    image_id = conv.prepare_tokenizer(tok, name)
    user = {"from": "human", "value": "<image>\nHow many?"}
    train = conv.tokenize_with_labels(tok, name, [user, {"from": "gpt", "value": answer}], image_token_id=image_id)
    prompt = conv.tokenize_with_labels(tok, name, [user], image_token_id=image_id, add_generation_prompt=True)
    n = len(prompt["input_ids"])
    assert train["input_ids"][:n] == prompt["input_ids"]
    assert all(lab != -100 for lab in train["labels"][n:])
    assert all(lab == -100 for lab in train["labels"][:n])


def test_empty_messages_render_as_the_original():
    # Conversation.get_prompt: an empty message is the bare role tag (no separator) in the v0/v1/mpt
    # styles and is left out in llama_2; it is never supervised.
    msgs = [("user", "Q1"), ("assistant", ""), ("user", "Q2"), ("assistant", "A2")]
    cases = {
        "v1": ("USER: Q1 ASSISTANT:USER: Q2 ASSISTANT: A2</s>", ["A2</s>"]),
        "v0": ("###Human: Q1###Assistant:Human: Q2###Assistant: A2###", ["A2###"]),
        "llama_2": ("\n\nQ1 [/INST]<s>[INST] Q2 [/INST] A2 </s>", ["A2 </s>"]),
        "chatml": ("<|im_start|>user\nQ1<|im_end|><|im_start|>assistant\n<|im_start|>user\nQ2<|im_end|>"
                   "<|im_start|>assistant\nA2<|im_end|>", ["A2<|im_end|>"]),
    }
    for name, (suffix, answers) in cases.items():
        text, spans = conv.render(name, msgs)
        assert text.endswith(suffix), (name, text)
        assert [text[a:b] for a, b in spans] == answers
    assert conv.render("v1", msgs[:2])[0].endswith("USER: Q1 ASSISTANT:")
    with pytest.raises(ValueError, match="non-empty first user turn"):
        conv.render("llama_2", [("user", ""), ("assistant", "A")])
