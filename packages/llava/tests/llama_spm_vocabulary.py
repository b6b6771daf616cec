"""LLaMA's SentencePiece ``tokenizer.model``, rebuilt from the GGUF vocabulary that llama.cpp ships.

No PyPI wheel carries Meta's ``tokenizer.model``. The llama-cpp-python sdist carries llama.cpp's
``models/ggml-vocab-llama-spm.gguf`` (LLaMA's 32,000 pieces with their scores and types) and, beside it,
llama.cpp's tokenizer test texts (``.inp``) with the ids LLaMA's tokenizer gives them (``.out``).
``scripts/setup_env.sh`` puts those three files into the environment (``$VENV/share/mmr/llama-spm``);
``MMR_LLAMA_SPM_DIR`` points elsewhere (the nox sessions set it to the environment running nox).

GGUF keeps the pieces but not the settings SentencePiece encodes with. They are set here as LLaMA's own
``tokenizer.model`` records them in its ``trainer_spec`` / ``normalizer_spec`` (a print of both is in
karpathy/llama2.c, ``doc/train_llama_tokenizer.md``): BPE, byte fallback, whitespace-only pieces allowed,
identity normalization with a dummy prefix and no whitespace squeezing, ``<unk>``/``<s>``/``</s>`` = 0/1/2,
no padding piece. ``test_llama_spm_vocabulary.py`` proves the result is LLaMA's tokenizer: SentencePiece
gives every ``.inp`` text exactly its ``.out`` ids.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

DIR_VARIABLE = "MMR_LLAMA_SPM_DIR"
GGUF_NAME = "ggml-vocab-llama-spm.gguf"
FILE_NAMES = (GGUF_NAME, GGUF_NAME + ".inp", GGUF_NAME + ".out")
VOCAB_SIZE = 32000
# llama.cpp's .inp file: texts, each followed by this line (tests/test-tokenizer-0 splits on it).
TEXT_SEPARATOR = "\n__ggml_vocab_test__\n"
HOW_TO_GET = (f"run `bash scripts/setup_env.sh` (it takes them from the llama-cpp-python sdist on PyPI), "
              f"or set {DIR_VARIABLE} to a folder holding them")

# LLaMA's tokenizer.model trainer_spec, every field of the print except the training input's paths
# (`input`, `model_prefix`). BPE encoding reads model_type, byte_fallback, the special ids and pieces and
# unk_surface; the rest describes how the vocabulary was trained and is kept so the file says what LLaMA's does.
LLAMA_TRAINER_SPEC = {
    "model_type": "BPE",
    "vocab_size": VOCAB_SIZE,
    "self_test_sample_size": 0,
    "input_format": "text",
    "character_coverage": 0.99995,
    "input_sentence_size": 200_000_000,
    "seed_sentencepiece_size": 1_000_000,
    "shrinking_factor": 0.75,
    "num_threads": 80,
    "num_sub_iterations": 2,
    "max_sentence_length": 4192,
    "shuffle_input_sentence": True,
    "max_sentencepiece_length": 16,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "treat_whitespace_as_suffix": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "vocabulary_output_piece_score": True,
    "hard_vocab_limit": True,
    "use_all_vocab": False,
    "byte_fallback": True,
    "required_chars": "",
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_surface": " \u2047 ",
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
    "pad_piece": "<pad>",
    "train_extremely_large_corpus": False,
    "enable_differential_privacy": False,
    "differential_privacy_noise_level": 0.0,
    "differential_privacy_clipping_threshold": 0,
}
LLAMA_NORMALIZER_SPEC = {
    "name": "identity",
    "precompiled_charsmap": b"",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_tsv": "",
}
# What the GGUF file must say for the pieces to be LLaMA's layout (key: value).
EXPECTED_GGUF_FIELDS = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.unknown_token_id": 0,
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
}


def vocabulary_dir() -> Path:
    """The folder holding the three files: ``$MMR_LLAMA_SPM_DIR``, else this environment's ``share/mmr/llama-spm``."""
    configured = os.environ.get(DIR_VARIABLE)
    if configured:
        return Path(configured)
    return Path(sysconfig.get_paths()["data"], "share", "mmr", "llama-spm")


def missing_files(folder: Path) -> list[str]:
    """Names of the three files that ``folder`` lacks (empty when all are there)."""
    return [name for name in FILE_NAMES if not (folder / name).is_file()]


def read_gguf_vocabulary(gguf_path: Path) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types of a GGUF tokenizer, checked against LLaMA's layout.

    Args:
        gguf_path: A ``ggml-vocab-*.gguf`` file.

    Returns:
        ``(pieces, scores, types)``, one entry per id; types use GGUF's numbering, which is
        SentencePiece's (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).

    Raises:
        ValueError: naming the file and key when a field is missing or not LLaMA's.
    """
    import gguf

    fields = gguf.GGUFReader(gguf_path).fields

    def value(key: str):
        if key not in fields:
            raise ValueError(f"{gguf_path}: GGUF key {key!r} is missing")
        return fields[key].contents()

    for key, expected in EXPECTED_GGUF_FIELDS.items():
        if value(key) != expected:
            raise ValueError(f"{gguf_path}: GGUF key {key!r} is {value(key)!r}, LLaMA's is {expected!r}")
    pieces = value("tokenizer.ggml.tokens")
    scores = value("tokenizer.ggml.scores")
    types = value("tokenizer.ggml.token_type")
    for key, column in (("tokenizer.ggml.tokens", pieces), ("tokenizer.ggml.scores", scores),
                        ("tokenizer.ggml.token_type", types)):
        if len(column) != VOCAB_SIZE:
            raise ValueError(f"{gguf_path}: GGUF key {key!r} holds {len(column)} entries, LLaMA's {VOCAB_SIZE}")
    return list(pieces), [float(s) for s in scores], [int(t) for t in types]


def llama_model_proto(gguf_path: Path):
    """LLaMA's SentencePiece ``ModelProto``: the GGUF pieces with LLaMA's trainer and normalizer settings.

    Args:
        gguf_path: llama.cpp's ``ggml-vocab-llama-spm.gguf``.

    Returns:
        A ``sentencepiece_model_pb2.ModelProto``.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    for name, setting in LLAMA_TRAINER_SPEC.items():
        if name == "model_type":
            setting = spm_pb2.TrainerSpec.ModelType.Value(setting)
        setattr(proto.trainer_spec, name, setting)
    for name, setting in LLAMA_NORMALIZER_SPEC.items():
        setattr(proto.normalizer_spec, name, setting)
    for piece, score, piece_type in zip(*read_gguf_vocabulary(gguf_path)):
        proto.pieces.add(piece=piece, score=score, type=piece_type)
    return proto


def write_tokenizer_model(gguf_path: Path, folder: Path) -> Path:
    """Write LLaMA's ``tokenizer.model`` (from ``gguf_path``) into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.model"
    path.write_bytes(llama_model_proto(gguf_path).SerializeToString())
    return path


def read_test_cases(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test texts beside ``gguf_path`` with the ids LLaMA's tokenizer gives them.

    The ``.inp`` file holds texts, each followed by a ``__ggml_vocab_test__`` line; the ``.out`` file one
    line of space-separated ids per text (no BOS), empty for the empty text.

    Raises:
        ValueError: naming the files when they do not hold one id line per text.
    """
    inp = Path(f"{gguf_path}.inp")
    out = Path(f"{gguf_path}.out")
    raw = inp.read_text(encoding="utf-8")
    if not raw.endswith(TEXT_SEPARATOR):
        raise ValueError(f"{inp}: does not end with a {TEXT_SEPARATOR.strip()} line")
    texts = raw[: -len(TEXT_SEPARATOR)].split(TEXT_SEPARATOR)
    lines = out.read_text(encoding="utf-8").split("\n")
    if lines[-1] != "" or len(lines) - 1 != len(texts):
        raise ValueError(f"{out}: {len(lines) - 1} id lines for the {len(texts)} texts of {inp}")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines[:-1])]
