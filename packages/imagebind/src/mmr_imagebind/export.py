"""Export one modality encoder as a graph (ONNX or ``torch.export``) and check it against eager PyTorch.

Each export is a single-input, single-output graph: the model-ready input of one modality (what
:mod:`mmr_imagebind.data` and :func:`mmr_imagebind.evaluation.load_inputs` produce) -> its postprocessed
embedding (L2-normalised, times the modality's logit scale), with a dynamic batch axis. Beside the graph a
small JSON file records the input and output names, shapes and dtypes, the logit scale and the parity check.

The parity check runs the graph as its users will (``onnxruntime`` for ONNX, the ``.pt2`` file read back
with ``torch.export.load(...).module()`` for ``torch.export``) on fresh inputs of another batch size than the
one the graph was traced with, and compares it with the eager model on the same inputs; the bound is
:func:`parity_tolerance`. ONNX needs the ``export`` extra (``onnx``, ``onnxscript``, ``onnxruntime``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_state_dict_strict
from .config import MODALITIES, ImageBindConfig
from .data import AUDIO_CLIPS
from .model import ImageBind

FORMATS = ("onnx", "torch.export")


class ExportParityError(RuntimeError):
    """An exported graph whose embeddings differ from eager PyTorch's by more than :func:`parity_tolerance`."""

# float32 unit roundoff (2^-24): the relative error of one correctly rounded operation.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def single_modality(model: ImageBind, modality: str) -> ImageBind:
    """An :class:`ImageBind` holding only ``modality``'s encoder, sharing ``model``'s tensors (no copy).

    A traced graph lifts every parameter of the module it is given, so exporting from a six-modality model
    would carry the other five encoders' weights; this view has only the one encoder's.
    """
    if modality not in model.modalities:
        raise KeyError(f"modality {modality!r} was not built; this model has {list(model.modalities)}")
    with torch.device("meta"):
        view = ImageBind(replace(model.config, modalities=(modality,)))
    load_state_dict_strict(view, model.state_dict(), source=f"the {modality} encoder", assign=True)
    return view.train(model.training)


class ModalityEncoder(nn.Module):
    """One modality's encoder as a one-tensor module: model-ready input -> postprocessed embedding.

    Args:
        model: The model (any modalities; only ``modality``'s weights are kept, shared, see
            :func:`single_modality`).
        modality: The encoder to wrap.
    """

    def __init__(self, model: ImageBind, modality: str) -> None:
        super().__init__()
        self.modality = modality
        self.model = single_modality(model, modality).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(self.modality, x)


def input_shape(config: ImageBindConfig, modality: str, clips: int | None = None) -> list[int | str]:
    """The graph input's shape, ``"batch"`` for the dynamic axis.

    vision ``(batch, 3, S, S)`` images (with ``clips``: ``(batch, clips, 3, frames, S, S)`` videos); text
    ``(batch, context)`` token ids; audio ``(batch, clips, 1, mel, frames)``, 3 clips by default as the
    official loader cuts them; depth and thermal ``(batch, 1, S, S)``; IMU ``(batch, 6, samples)``.
    """
    c = config
    if modality == "vision":
        if clips is None:
            return ["batch", 3, c.vision_image_size, c.vision_image_size]
        return ["batch", clips, 3, c.vision_frames, c.vision_image_size, c.vision_image_size]
    if clips is not None and modality != "audio":
        raise ValueError(f"clips applies to audio and video (vision) only, not {modality}")
    if modality == "text":
        return ["batch", c.text_context_length]
    if modality == "audio":
        return ["batch", AUDIO_CLIPS if clips is None else clips, 1, c.audio_num_mel_bins, c.audio_target_len]
    if modality in ("depth", "thermal"):
        size = getattr(c, f"{modality}_image_size")
        return ["batch", 1, size, size]
    if modality == "imu":
        return ["batch", c.imu_channels, c.imu_length]
    raise ValueError(f"unknown modality {modality!r}; choose from {MODALITIES}")


def example_input(
    config: ImageBindConfig, modality: str, batch_size: int, clips: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Random model-ready input of :func:`input_shape` with ``batch_size`` rows.

    Float inputs are standard normal (the loaders standardise images, depth and filterbanks to about that
    range). Text rows are CLIP-like: a start token, random ids, the end-of-text id (the vocabulary's
    largest, where the head pools) at a random position, then zero padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    shape = [batch_size if d == "batch" else d for d in input_shape(config, modality, clips)]
    if modality != "text":
        return torch.randn(shape, generator=gen)
    vocab, context = config.text_vocab_size, config.text_context_length
    ids = torch.zeros(shape, dtype=torch.long)
    for row in ids:
        end = int(torch.randint(1, context, (), generator=gen))
        row[0] = vocab - 2  # start-of-text sits just below end-of-text in CLIP's vocabulary
        row[1:end] = torch.randint(1, vocab - 2, (end - 1,), generator=gen)
        row[end] = vocab - 1
    return ids


def parity_tolerance(config: ImageBindConfig, modality: str, logit_scale: float) -> float:
    """The largest difference allowed between an exported graph's embedding and eager PyTorch's.

    Both sides evaluate the same float32 function and differ only in summation order and kernels (oneDNN
    or MKL in PyTorch, MLAS in onnxruntime; fused LayerNorm, softmax and GELU; AVX-512 or AVX2 on Intel
    and AMD alike): each rounds every operation correctly, in its own order. The rounding error of a dot
    product of ``K`` terms is then about ``lam * sqrt(K) * u`` relative (u = 2^-24; Higham and Mary's 2019
    probabilistic bound for rounding errors of random sign, exceeded with probability below
    ``2 exp(-lam^2 / 2)``, 3e-4 at ``lam = 4``). Each block puts 4 such products in a row on the
    residual stream (qkv projection, attention, output projection, MLP), the widest of inner size
    ``4 * width`` (fc2); with the stem and the head, ``P = 4 * blocks + 2`` products whose errors, again of
    random sign, add to ``sqrt(P)`` times one. The embedding is L2-normalised (a relative error of the
    vector stays one of the unit vector) and multiplied by ``logit_scale``, so every element of each side's
    error is below ``logit_scale * lam * sqrt(P) * sqrt(4 * width) * u``; the difference of the two sides
    at most twice that. Nothing here depends on the CPU: vendor and vector width only pick which correctly
    rounded order is used.

    ImageBind-Huge audio (12 blocks of 768, scale 20): 3.7e-3, i.e. 1.9e-4 of the scale; measured
    1.4e-6 (random weights, onnxruntime 1.32 on an AMD EPYC). The tiny config's thermal encoder: 1.2e-4;
    measured 3.8e-6. A wrong weight or operation changes the embedding by a sizeable part of the scale.

    Args:
        config: The model's sizes.
        modality: The exported encoder.
        logit_scale: The postprocessor's scale (the embedding's norm).

    Returns:
        The absolute tolerance on every element of the embedding.
    """
    width = getattr(config, f"{modality}_embed_dim")
    products_in_a_row = 4 * getattr(config, f"{modality}_num_blocks") + 2
    lam = 4.0
    one_side = logit_scale * lam * math.sqrt(products_in_a_row) * math.sqrt(4 * width) * FLOAT32_UNIT_ROUNDOFF
    return 2 * one_side


def export_modality(
    model: ImageBind,
    modality: str,
    out_dir: str | Path,
    format: str = "onnx",
    clips: int | None = None,
    trace_batch_size: int = 2,
    check_batch_size: int = 3,
    opset: int | None = None,
    seed: int = 0,
) -> dict:
    """Export one modality encoder, check it against eager, and write ``imagebind_<modality>.{onnx,pt2,json}``.

    Args:
        model: An ImageBind with ``modality`` built (weights loaded); exported in float32 on the CPU (a view
            is converted, ``model`` itself is left as it is).
        modality: The encoder to export.
        out_dir: Folder for the graph (``.onnx``, with ``.onnx.data`` beside it above ONNX's 2 GB protobuf
            limit; or ``.pt2``) and the JSON description.
        format: ``"onnx"`` or ``"torch.export"``.
        clips: Clips per sample for audio (default 3, the official loader's) or videos for vision
            (default: single images).
        trace_batch_size: Batch size of the tracing input (the batch axis stays dynamic).
        check_batch_size: Batch size of the parity check, another than the tracing one so that the check
            also covers the dynamic batch axis.
        opset: ONNX opset (default: PyTorch's exporter's).
        seed: Seed of the random inputs.

    Returns:
        The JSON description written beside the graph (its ``parity`` entry holds the measured difference).

    Raises:
        ValueError: Unknown format or modality, or clips for a modality without clips.
        ExportParityError: The saved graph differs from eager by more than the bound (the message gives
            both; the files stay for inspection).
        ImportError: ONNX requested without ``onnx``/``onnxscript``/``onnxruntime`` installed.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {FORMATS}")
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose from {MODALITIES}")
    if trace_batch_size == check_batch_size:
        raise ValueError("check_batch_size must differ from trace_batch_size, so the check covers the batch axis")
    # On a view with its own Parameter objects: the caller's model keeps its dtype and device.
    encoder = ModalityEncoder(model, modality).float().cpu().eval()
    output_name = f"{modality}_embedding"  # a bare "embedding" would clash with the text stem's node name
    config = encoder.model.config
    shape = input_shape(config, modality, clips)
    trace_input = example_input(config, modality, trace_batch_size, clips, seed)
    dynamic = ({0: torch.export.Dim("batch", min=1)},)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"imagebind_{modality}"
    with torch.no_grad():
        if format == "onnx":
            graph_path = out_dir / f"{stem}.onnx"
            opset = _export_onnx(encoder, trace_input, dynamic, modality, output_name, graph_path, opset)
        else:
            graph_path = out_dir / f"{stem}.pt2"
            torch.export.save(torch.export.export(encoder, (trace_input,), dynamic_shapes=dynamic), graph_path)
        check_input = example_input(config, modality, check_batch_size, clips, seed + 1)
        eager = encoder(check_input)
        exported = _run_exported(format, graph_path, modality, output_name, check_input)
        scale = float(encoder.model.logit_scale(modality))
    diff = float((exported - eager).abs().max())
    tolerance = parity_tolerance(config, modality, scale)
    meta = {
        "modality": modality,
        "format": format,
        "graph": graph_path.name,
        "config": config.to_dict(),
        "inputs": [{"name": modality, "shape": shape, "dtype": str(trace_input.dtype).removeprefix("torch.")}],
        "outputs": [{"name": output_name, "shape": ["batch", config.out_embed_dim], "dtype": "float32"}],
        "postprocessed": "L2-normalised, times logit_scale",
        "logit_scale": scale,
        "torch_version": torch.__version__,
        "parity": {"reference": "eager PyTorch, float32", "batch_size": check_batch_size,
                   "max_abs_diff": diff if math.isfinite(diff) else None,  # None: NaN or inf in the output
                   "tolerance": tolerance, "passed": diff <= tolerance},
    }  # fmt: skip
    if format == "onnx":
        meta["opset"] = opset
    text = json.dumps(meta, indent=1, allow_nan=False)
    (out_dir / f"{stem}.json").write_text(text + "\n")
    if not diff <= tolerance:  # also catches NaN
        raise ExportParityError(f"exported {modality} graph {graph_path} differs from eager PyTorch by {diff:.3g} "
                                f"(bound {tolerance:.3g})")  # fmt: skip
    return json.loads(text)  # as the file holds it (lists, not tuples)


def _export_onnx(
    encoder: nn.Module,
    x: torch.Tensor,
    dynamic: tuple,
    modality: str,
    output_name: str,
    path: Path,
    opset: int | None,
) -> int:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator; import it to fail with a clear message)
    except ImportError as e:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'mmr-imagebind[export]'") from e
    program = torch.onnx.export(encoder, (x,), None, dynamo=True, input_names=[modality], output_names=[output_name],
                                dynamic_shapes=dynamic, opset_version=opset, verbose=False)  # fmt: skip
    # Weights go to `<name>.onnx.data` only above protobuf's 2 GB limit (ImageBind-Huge's vision encoder).
    program.save(path)
    return int(program.model.opset_imports[""])


def _run_exported(format: str, path: Path, modality: str, output_name: str, x: torch.Tensor) -> torch.Tensor:
    """Run the saved graph as a user would: onnxruntime, or the ``.pt2`` read back from disk."""
    if format == "torch.export":
        return torch.export.load(path).module()(x)
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("checking an ONNX export needs onnxruntime: pip install 'mmr-imagebind[export]'") from e
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([output_name], {modality: x.numpy()})[0])


def export_modalities(
    model: ImageBind, modalities: Sequence[str], out_dir: str | Path, format: str = "onnx", **kwargs
) -> list[dict]:
    """:func:`export_modality` for several modalities into one folder."""
    return [export_modality(model, m, out_dir, format, **kwargs) for m in modalities]


__all__ = [
    "FORMATS",
    "ExportParityError",
    "ModalityEncoder",
    "example_input",
    "export_modalities",
    "export_modality",
    "input_shape",
    "parity_tolerance",
    "single_modality",
]
