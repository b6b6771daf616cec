"""The original LLaVA's tokenization, written down from its facts for the golden tests.

An independent re-statement (not our code path) of what haotian-liu/LLaVA does with the libraries it pins
(transformers 4.37.2 with the slow, SentencePiece ``LlamaTokenizer``, tokenizers 0.15.1):

- ``llava/train/train.py:preprocess_multimodal``: a turn holding ``<image>`` loses it, is stripped, and
  becomes ``"<image>\\n" + rest``.
- ``llava/conversation.py:Conversation.get_prompt`` for the ``TWO`` (v1), ``LLAMA_2`` and ``PLAIN`` styles,
  including what an empty message renders to.
- ``llava/mm_utils.py:tokenizer_image_token``: the prompt split at ``<image>``, each chunk tokenized with
  its BOS, the BOS dropped from every chunk but the first, ``-200`` between chunks.
- ``preprocess_v1`` / ``preprocess_llama_2`` / ``preprocess_plain``: the label arithmetic (rounds split at
  ``sep2``, ``instruction_len - 2``, the ``-1`` for non-legacy tokenizers in v1, the whole sample masked
  when the counts disagree).
- transformers 4.37's slow ``LlamaTokenizer.tokenize``: special tokens split out first; legacy mode encodes
  every other chunk with SentencePiece's dummy prefix; non-legacy mode loads the model without the dummy
  prefix, puts one ``▁`` before the whole text, and encodes a chunk that starts with ``▁``/space after an
  ``<unk>`` that is then cut off.
"""

from __future__ import annotations

import re

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE = "<image>"
V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using natural "
                 "language.")


class SlowLlamaTokenizer:
    """transformers 4.37.2 ``LlamaTokenizer`` (``use_fast=False``) on a SentencePiece model file."""

    SPECIAL = ("<unk>", "<s>", "</s>")

    def __init__(self, model_file: str, legacy: bool):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
        if not legacy:  # get_spm_processor: the non-legacy tokenizer turns the dummy prefix off
            proto.normalizer_spec.add_dummy_prefix = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = legacy
        self.unk_token_length = len(self.sp.encode("<unk>", out_type=str))
        self.bos_token_id = 1

    def _tokenize(self, text: str) -> list[str]:
        tokens = self.sp.encode(text, out_type=str)
        if self.legacy or not text.startswith(("▁", " ")):
            return tokens
        return self.sp.encode("<unk>" + text, out_type=str)[self.unk_token_length:]

    def _split_special(self, text: str) -> list[str]:
        out: list[str] = []
        for chunk in re.split("(" + "|".join(map(re.escape, self.SPECIAL)) + ")", text):
            if chunk in self.SPECIAL:
                out.append(chunk)
            elif chunk:
                out += self._tokenize(chunk)
        return out

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or not text:
            return self._split_special(text)
        tokens = self._split_special("▁" + text.replace("▁", " "))
        if len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in self.SPECIAL:
            tokens = tokens[1:]
        return tokens

    def __call__(self, text: str) -> list[int]:
        """``tokenizer(text).input_ids``: BOS, then the pieces' ids."""
        return [self.bos_token_id] + [self.sp.piece_to_id(p) for p in self.tokenize(text)]


def tokenizer_image_token(prompt: str, tokenizer: SlowLlamaTokenizer) -> list[int]:
    chunks = [tokenizer(chunk) for chunk in prompt.split(IMAGE)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separated: list[list[int]] = []
    for k, chunk in enumerate(chunks):
        if k:
            separated.append([IMAGE_TOKEN_INDEX] * (offset + 1))
        separated.append(chunk)
    for x in separated:
        ids.extend(x[offset:])
    return ids


def preprocess_multimodal(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    out = []
    for sentence in conversation:
        value = sentence["value"]
        if IMAGE in value:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append(dict(sentence, value=value))
    return out


def prompt_v1(conversation: list[dict[str, str]]) -> str:
    roles, seps = ("USER", "ASSISTANT"), (" ", "</s>")
    ret = V1_SYSTEM + seps[0]
    for i, sentence in enumerate(conversation):
        if sentence["value"]:
            ret += roles[i % 2] + ": " + sentence["value"] + seps[i % 2]
        else:
            ret += roles[i % 2] + ":"
    return ret


def prompt_llama_2(conversation: list[dict[str, str]]) -> str:
    ret = ""
    for i, sentence in enumerate(conversation):
        message = sentence["value"]
        if not message:
            continue
        if i == 0:
            message = f"<<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n" + message
        if i % 2 == 0:
            ret += "<s>" + f"[INST] {message} [/INST]"
        else:
            ret += " " + message + " " + "</s>"
    return ret.lstrip("<s>")


def _mask_rounds(prompt: str, ids: list[int], tokenizer: SlowLlamaTokenizer, sep: str, sep2: str,
                 non_legacy_fix: bool, model_max_length: int) -> list[int]:
    """The shared label loop of ``preprocess_v1`` / ``preprocess_llama_2``."""
    target = list(ids)
    total_len = len(ids)  # no padding in a batch of one
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, rou in enumerate(prompt.split(sep2)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        if non_legacy_fix and i != 0 and not tokenizer.legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur_len: cur_len + instruction_len] = [IGNORE_INDEX] * len(target[cur_len: cur_len + instruction_len])
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * len(target[cur_len:])
    if cur_len < model_max_length and cur_len != total_len:
        target = [IGNORE_INDEX] * len(target)  # "WARNING: tokenization mismatch ... (ignored)"
    return target


def preprocess(template: str, conversation: list[dict[str, str]], tokenizer: SlowLlamaTokenizer,
               model_max_length: int = 2048) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record, as the original's dataset makes them (before collation)."""
    conversation = preprocess_multimodal(conversation)
    if template == "plain":
        assert len(conversation) == 2 and IMAGE in conversation[0]["value"]
        prompt = IMAGE + conversation[1]["value"] + "\n"
        ids = tokenizer_image_token(prompt, tokenizer)
        n = len(tokenizer_image_token(IMAGE, tokenizer))
        return ids, [IGNORE_INDEX] * n + ids[n:]
    if template == "v1":
        prompt = prompt_v1(conversation)
        ids = tokenizer_image_token(prompt, tokenizer)
        return ids, _mask_rounds(prompt, ids, tokenizer, " ASSISTANT: ", "</s>", True, model_max_length)
    if template == "llama_2":
        prompt = prompt_llama_2(conversation)
        ids = tokenizer_image_token(prompt, tokenizer)
        return ids, _mask_rounds(prompt, ids, tokenizer, "[/INST] ", "</s>", False, model_max_length)
    raise ValueError(template)
