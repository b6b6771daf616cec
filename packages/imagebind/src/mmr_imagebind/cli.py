"""Command line ``mmr-imagebind``: embed files, classify them zero-shot, retrieve across modalities, export
encoders, train.

::

    mmr-imagebind embed    --checkpoint imagebind_huge.pth --modality audio a.wav b.wav --out emb.safetensors
    mmr-imagebind zeroshot --checkpoint ckpt.safetensors --modality audio --classes dog,rain,car *.wav
    mmr-imagebind retrieve --checkpoint ckpt.pth --query "a barking dog" --gallery-modality vision *.jpg
    mmr-imagebind export   --checkpoint imagebind_huge.pth --modality audio --format onnx --out exported/
    mmr-imagebind train    --recipe AS init_checkpoint=imagebind_huge.pth train_shards=DIR out_dir=runs/as

(``python -m mmr_imagebind.cli`` is the same program.) ``--checkpoint`` is the official ``imagebind_huge.pth``,
a ``.safetensors`` file of this package (its config is stored inside), or a folder written by
``ImageBind.save_pretrained`` or a hub id of one (``org/name``, from the local Hugging Face cache under
``HF_HUB_OFFLINE=1``); only the modalities a command needs are built and read. A ``.pth`` built with other
arguments of the official ``ImageBindModel`` constructor takes ``--config model.yaml`` (or ``.json``): a mapping
of those keyword arguments, e.g. ``{vision_embed_dim: 1280, vision_num_blocks: 32, out_embed_dim: 1024}``,
unnamed ones at the constructor's defaults (see ``ImageBindConfig.from_official_kwargs``); ``--config`` also
takes a named size (``imagebind_huge``, ``tiny``). A ``.pth`` is read with ``weights_only=True``: pickled
objects other than tensors are refused (``--trust-pickle`` lifts that for files you trust). Images may be in
any format PIL reads (JPEG, PNG, WebP, TIFF, BMP, GIF, ...). Mistakes on the command line, unreadable inputs
and checkpoints that do not match print ``error: ...`` and exit with status 2; an export whose graph does not
match eager PyTorch exits with 1. Text uses CLIP's BPE (``--bpe`` or ``$MMR_IMAGEBIND_BPE``), or for small
models trained with a word vocabulary, ``--vocab words.txt`` (one word a line; see
:class:`mmr_imagebind.tokenizer.WordTokenizer`). ``--labels`` gives zero-shot ground truth (class names, one
per file, comma-separated) to print top-1/top-5. ``train --help`` lists every training setting with its
type, default and meaning.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mmr_core.cli import CommandLine, HelpFormatter

from .checkpoint import CheckpointMismatchError, CheckpointReadError, load_imagebind
from .config import MODALITIES, NAMED_CONFIGS, OFFICIAL_CONSTRUCTOR_DEFAULTS, ImageBindConfig
from .evaluation import embed, load_inputs
from .model import ImageBind
from .train import add_train_arguments, config_from_train_args
from .train import run as run_training
from .zeroshot import DEFAULT_TEMPLATES, text_classifier, top_k_accuracy, zero_shot_logits


def _tokenizer(args: argparse.Namespace, model: ImageBind):
    cfg = model.config
    if args.vocab:
        from .tokenizer import WordTokenizer

        words = [w.strip() for w in Path(args.vocab).read_text().splitlines() if w.strip()]
        return WordTokenizer(words, cfg.text_context_length, cfg.text_vocab_size, too_long=args.too_long_text)
    from .tokenizer import CLIPTokenizer

    return CLIPTokenizer(args.bpe, context_length=cfg.text_context_length, vocab_size=cfg.text_vocab_size,
                         too_long=args.too_long_text)  # fmt: skip


def model_config(spec: str | None) -> str | ImageBindConfig | None:
    """``--config``: None, a named size, or a JSON/YAML file of official ``ImageBindModel`` keyword arguments.

    Raises:
        ValueError: An unknown name, a missing or unreadable file, a file that is not a mapping, a keyword
            the official constructor does not take, or a value of the wrong type (the message names the file).
    """
    if spec is None or spec in NAMED_CONFIGS:
        return spec
    path = Path(spec)
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise ValueError(f"--config {spec!r} is neither a named config {sorted(NAMED_CONFIGS)} nor a .json/.yaml file")
    if not path.is_file():
        raise ValueError(f"--config file {path} does not exist")
    import yaml  # JSON is a subset of YAML: one parser for both

    try:
        kwargs = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read --config file {path}: {e}") from e
    if not isinstance(kwargs, dict):
        raise ValueError(f"--config file {path} must hold a mapping of ImageBindModel keyword arguments")
    for key, value in kwargs.items():
        default = OFFICIAL_CONSTRUCTOR_DEFAULTS.get(key)
        if isinstance(default, tuple):
            ok = isinstance(value, list | tuple) and len(value) == len(default)
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = default is None or (isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"--config file {path}: {key}={value!r} should be like {default!r}")
    try:
        return ImageBindConfig.from_official_kwargs(**kwargs)
    except ValueError as e:
        raise ValueError(f"--config file {path}: {e}") from e


def _load(args: argparse.Namespace, modalities: list[str]) -> ImageBind:
    path = Path(args.checkpoint)
    if not path.exists() and "/" not in args.checkpoint.strip("/"):
        raise ValueError(f"checkpoint {path} does not exist")
    config = model_config(args.config)
    model = load_imagebind(path, config=config, modalities=list(dict.fromkeys(modalities)), trust_pickle=args.trust_pickle)
    return model.to(args.device, getattr(torch, args.dtype)).eval()


def _inputs(args, model: ImageBind, modality: str, items: list[str]):
    if modality != "text":
        missing = [f for f in items if not Path(f).is_file()]
        if missing:
            raise ValueError(f"input files not found: {missing[:5]}")
    return load_inputs(modality, items, model.config, args.focal_length, args.depth_scale)


def cmd_embed(args: argparse.Namespace) -> dict:
    model = _load(args, [args.modality])
    tok = _tokenizer(args, model) if args.modality == "text" else None
    x = _inputs(args, model, args.modality, args.inputs)
    emb = embed(model, args.modality, x, tok, args.batch_size, compile=args.compile)
    if args.out:
        from safetensors.torch import save_file

        save_file({"embeddings": emb.contiguous()}, args.out, metadata={"inputs": json.dumps(args.inputs),
                                                                        "modality": args.modality})  # fmt: skip
    return {"modality": args.modality, "count": emb.shape[0], "dim": emb.shape[1], "out": args.out}


def cmd_zeroshot(args: argparse.Namespace) -> dict:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(classes) < 2:
        raise ValueError("--classes needs at least two comma-separated class names")
    model = _load(args, ["text", args.modality])
    tok = _tokenizer(args, model)
    templates = args.templates or list(DEFAULT_TEMPLATES)
    classifier = text_classifier(model, tok, classes, templates)
    x = _inputs(args, model, args.modality, args.inputs)
    emb = embed(model, args.modality, x, batch_size=args.batch_size, compile=args.compile)
    probs = (100.0 * zero_shot_logits(emb, classifier)).softmax(-1)
    preds = [{"input": f, "class": classes[int(p.argmax())], "prob": round(float(p.max()), 4)}
             for f, p in zip(args.inputs, probs)]  # fmt: skip
    out: dict = {"predictions": preds}
    if args.labels:
        labels = [c.strip() for c in args.labels.split(",")]
        unknown = sorted(set(labels) - set(classes))
        if len(labels) != len(args.inputs) or unknown:
            raise ValueError(f"--labels needs one known class per input (unknown: {unknown})")
        y = torch.tensor([classes.index(c) for c in labels])
        out["top1"] = top_k_accuracy(probs, y, 1)
        out["top5"] = top_k_accuracy(probs, y, 5)
    return out


def cmd_retrieve(args: argparse.Namespace) -> dict:
    model = _load(args, [args.query_modality, args.gallery_modality])
    tok = _tokenizer(args, model) if "text" in (args.query_modality, args.gallery_modality) else None
    queries = args.query
    q = embed(model, args.query_modality, _inputs(args, model, args.query_modality, queries), tok, args.batch_size,
              desc="embed queries", compile=args.compile)  # fmt: skip
    g = embed(model, args.gallery_modality, _inputs(args, model, args.gallery_modality, args.inputs), tok,
              args.batch_size, desc="embed gallery", compile=args.compile)  # fmt: skip
    scores, idx = zero_shot_logits(q, g).topk(min(args.top_k, g.shape[0]), dim=1)
    return {"results": [{"query": qq, "matches": [{"item": args.inputs[int(i)], "score": round(float(s), 4)}
                                                  for s, i in zip(sc, ix)]}
                        for qq, sc, ix in zip(queries, scores, idx)]}  # fmt: skip


def cmd_export(args: argparse.Namespace) -> dict:
    from .export import export_modality

    modalities = list(MODALITIES) if args.modality == "all" else [args.modality]
    model = _load(args, modalities)
    results = []
    for m in modalities:
        try:
            meta = export_modality(model, m, args.out, args.format, clips=args.clips, opset=args.opset)
        except ImportError as e:
            raise ValueError(str(e)) from e
        parity = meta["parity"]
        print(f"{m}: {args.format} graph {Path(args.out) / meta['graph']}; max |exported - eager| = "
              f"{parity['max_abs_diff']:.3g} <= bound {parity['tolerance']:.3g} (batch {parity['batch_size']})",
              file=sys.stderr)  # fmt: skip
        results.append({k: meta[k] for k in ("modality", "format", "graph", "inputs", "outputs", "parity")})
    return {"out": args.out, "exports": results}


DESCRIPTION = "ImageBind: embed files, zero-shot classify, retrieve across modalities, export encoders, train."


class _Formatter(HelpFormatter):
    """The shared formatter, with an option's default appended to its help line where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _printing(handler):
    def run(args: argparse.Namespace) -> int:
        print(json.dumps(handler(args), indent=1))
        return 0

    return run


def build_cli() -> CommandLine:
    """The ``mmr-imagebind`` program (subcommands embed, zeroshot, retrieve, export, train)."""
    cli = CommandLine("mmr-imagebind", DESCRIPTION,
                      user_errors=(ValueError, KeyError, CheckpointMismatchError, CheckpointReadError))  # fmt: skip
    cli.parser.description = __doc__
    cli.parser.formatter_class = _Formatter

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sp = cli.command(name, handler, help)
        sp.formatter_class = _Formatter
        return sp

    def common(sp: argparse.ArgumentParser, text: bool = True, inputs: bool = True) -> None:
        sp.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="imagebind_huge.pth, a .safetensors of this package, or a save_pretrained folder or "
                             "hub id (org/name; from the local cache under HF_HUB_OFFLINE=1)")  # fmt: skip
        sp.add_argument("--config", default=None, metavar="NAME|FILE",
                        help="named config (imagebind_huge, tiny) or a .json/.yaml file of the official "
                             "ImageBindModel keyword arguments the .pth was built with")  # fmt: skip
        sp.add_argument("--trust-pickle", action="store_true",
                        help="unpickle any object in a .pth (default: tensors only, so a file cannot run code); "
                             "only for files from a source you trust")  # fmt: skip
        if not inputs:
            return
        sp.add_argument("--batch-size", type=int, default=16, metavar="INT", help="inputs per forward pass")
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", metavar="DEVICE",
                        help="cpu, cuda or cuda:N")  # fmt: skip
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 is several times faster on GPUs and AMX CPUs but NOT exact (cosine "
                             "similarity to float32 embeddings about 0.9999)")  # fmt: skip
        sp.add_argument("--compile", action="store_true",
                        help="torch.compile the encoders (inference, frozen weights): faster per batch after a "
                             "compile of seconds to a minute; pays off on large input sets")  # fmt: skip
        sp.add_argument("--focal-length", type=float, default=None, metavar="FLOAT",
                        help="depth PNGs: camera fx in pixels, to turn distances into disparity")  # fmt: skip
        sp.add_argument("--depth-scale", type=float, default=None, metavar="FLOAT",
                        help="depth PNGs: metres per stored unit (default 0.001 for 16-bit; needed for 8-bit)")  # fmt: skip
        if text:
            sp.add_argument("--bpe", default=None, metavar="FILE",
                            help="CLIP bpe_simple_vocab_16e6.txt.gz (default: $MMR_IMAGEBIND_BPE or open_clip's)")  # fmt: skip
            sp.add_argument("--vocab", default=None, metavar="FILE", help="word list for small word-vocabulary models")
            sp.add_argument("--too-long-text", default="warn", choices=["warn", "error"],
                            help="text over the context (77 tokens): cut it with a warning (the official "
                                 "behaviour) or stop with an error")  # fmt: skip

    e = command("embed", _printing(cmd_embed), "embed files (or strings for text)")
    common(e)
    e.add_argument("--modality", required=True, choices=MODALITIES, help="what the inputs are")
    e.add_argument("--out", default=None, metavar="FILE", help="write embeddings to this .safetensors")
    e.add_argument("inputs", nargs="+", help="files (image, sound, .npy depth/IMU, depth PNG) or text strings")
    z = command("zeroshot", _printing(cmd_zeroshot), "classify files from class-name prompts")
    common(z)
    z.add_argument("--modality", required=True, choices=[m for m in MODALITIES if m != "text"], help="what the inputs are")
    z.add_argument("--classes", required=True, metavar="A,B,...", help="comma-separated class names")
    z.add_argument("--templates", nargs="*", default=None, metavar="TEMPLATE",
                   help="prompt templates with '{}' (default: 4 templates)")  # fmt: skip
    z.add_argument("--labels", default=None, metavar="A,B,...",
                   help="comma-separated true class per input, to score top-1/top-5")  # fmt: skip
    z.add_argument("inputs", nargs="+", help="files to classify")
    r = command("retrieve", _printing(cmd_retrieve), "rank gallery files for each query")
    common(r)
    r.add_argument("--query", nargs="+", required=True, help="query strings (text) or files")
    r.add_argument("--query-modality", default="text", choices=MODALITIES, help="what the queries are")
    r.add_argument("--gallery-modality", required=True, choices=MODALITIES, help="what the gallery files are")
    r.add_argument("--top-k", type=int, default=5, metavar="INT", help="matches listed per query")
    r.add_argument("inputs", nargs="+", help="gallery files")
    x = command("export", _printing(cmd_export),
                "export modality encoders (ONNX or torch.export) and check each against eager PyTorch")  # fmt: skip
    common(x, inputs=False)
    x.add_argument("--modality", required=True, choices=[*MODALITIES, "all"], help="the encoder to export")
    x.add_argument("--format", default="onnx", choices=["onnx", "torch.export"],
                   help="onnx (checked in onnxruntime; needs the export extra) or torch.export (a .pt2 file)")  # fmt: skip
    x.add_argument("--out", required=True, metavar="DIR",
                   help="folder for imagebind_<modality>.onnx/.pt2 and the .json of its input/output names and shapes")  # fmt: skip
    x.add_argument("--clips", type=int, default=None, metavar="INT",
                   help="clips per sample: audio (default 3, as the loader cuts them) or vision as videos "
                        "(default: single images)")  # fmt: skip
    x.add_argument("--opset", type=int, default=None, metavar="INT", help="ONNX opset (default: PyTorch's exporter's)")
    x.set_defaults(device="cpu", dtype="float32")
    t = command("train", _train, "bind a modality encoder to the frozen image/text encoders (the paper's recipe)")
    add_train_arguments(t)
    return cli


def _train(args: argparse.Namespace) -> int:
    return run_training(config_from_train_args(args))


def main(argv: list[str] | None = None) -> int:
    """Run ``mmr-imagebind``; user mistakes print ``error: ...`` and return 2, a failed export check 1."""
    from .export import ExportParityError

    try:
        return build_cli().main(argv)
    except ExportParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
