"""ImageBind's bad-input matrix (issue #17): each class of bad input and its exact outcome.

One test per case, named ``test_case_<case>``; ``docs/bad-inputs.md`` has one row per case in its ImageBind
table, and :func:`test_docs_table_matches_the_cases` keeps the two in step.
"""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmr_core.guards import NonFiniteLossError
from mmr_imagebind import cli
from mmr_imagebind import data as D
from mmr_imagebind.checkpoint import save_safetensors
from mmr_imagebind.model import ImageBind, ImageBindConfig
from mmr_imagebind.tokenizer import CLIPTokenizer, TextTooLongError, WordTokenizer, find_bpe_vocab

ROOT = Path(__file__).resolve().parents[3]
SR = 16000


def wav_bytes(seconds: float = 2.0, sr: int = SR) -> bytes:
    """A 16-bit PCM WAV of a 440 Hz tone."""
    buf = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(buf, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny tensors


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ImageBind(ImageBindConfig.from_name("tiny", modalities=("vision", "text", "audio", "depth")))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_safetensors(model, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------


def test_case_audio_truncated_wav(tmp_path: Path) -> None:
    full = wav_bytes()
    path = tmp_path / "cut.wav"
    path.write_bytes(full[: len(full) // 2])  # a download cut in the middle of the samples
    with pytest.raises(ValueError, match=r"audio .*cut\.wav is truncated: its header declares 64000 bytes"):
        D.load_and_transform_audio([path])
    (tmp_path / "whole.wav").write_bytes(full)
    assert D.load_audio(tmp_path / "whole.wav")[0].shape == (1, 32000)
    # A streamed WAV whose writer could not go back to fill in the sizes (0xFFFFFFFF) is complete: accepted.
    streamed = bytearray(full)
    data_at = streamed.index(b"data")
    streamed[4:8] = streamed[data_at + 4 : data_at + 8] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    assert D.load_audio(tmp_path / "streamed.wav")[0].shape == (1, 32000)


def test_case_audio_truncated_in_shard(tmp_path: Path) -> None:
    """In training shards a truncated recording is a counted skip, not a shorter clip."""
    from mmr_core.data import build_pipeline

    full = wav_bytes(0.5)
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tar:
        for key, audio in (("good0", full), ("cut", full[: len(full) // 2]), ("good1", full)):
            for ext, payload in (("png", png.getvalue()), ("wav", audio)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    pipe = build_pipeline(str(tmp_path), fields=("image", "audio"), shuffle=False)
    keys = [s["__key__"] for s in pipe]
    assert keys == ["good0", "good1"]
    assert pipe.skips.counts() == {"decode_audio": 1}
    assert pipe.skips.summary() == "skipped 1 of 3 (33.33%): decode_audio=1"


def test_case_audio_unreadable(tmp_path: Path) -> None:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000, np.float32), SR, format="FLAC")
    (tmp_path / "cut.flac").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "empty.wav").write_bytes(b"")
    for name in ("cut.flac", "empty.wav"):
        with pytest.raises(ValueError, match=rf"cannot read audio .*{re.escape(name)}: "):
            D.load_and_transform_audio([tmp_path / name])


def test_case_audio_no_samples(tmp_path: Path) -> None:
    sf.write(tmp_path / "none.wav", np.zeros(0, np.float32), SR)
    with pytest.raises(ValueError, match=r"audio .*none\.wav must be a non-empty \(channels, samples\) tensor"):
        D.load_and_transform_audio([tmp_path / "none.wav"])
    wave = torch.zeros(1, SR)
    wave[0, 100] = float("nan")
    with pytest.raises(ValueError, match="audio clip.wav contains NaN or infinite samples"):
        D.transform_audio(wave, SR, name="clip.wav")


# ----------------------------------------------------------------------------------------------------------
# Images and depth
# ----------------------------------------------------------------------------------------------------------


def test_case_image_unreadable(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    good = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(good, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[:200])
    with pytest.raises(ValueError, match=r"cut\.jpg: image: .*expected an image file PIL can read"):
        D.load_and_transform_vision([tmp_path / "cut.jpg"])
    ckpt = str(tiny_checkpoint)
    code, err = run_cli(["embed", "--checkpoint", ckpt, "--modality", "vision", str(tmp_path / "cut.jpg")], capsys)
    assert code == 2 and err.startswith("error: ") and "cut.jpg: image:" in err


def test_case_depth_palette(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    """Palette indices are not distances: refused even with an explicit scale, in the API and the CLI."""
    indices = np.arange(64, dtype=np.uint8).reshape(8, 8)
    img = Image.fromarray(indices, "P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img.save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "P"
    message = r"depth image .*depth\.png is a palette \(indexed-colour\) image"
    with pytest.raises(ValueError, match=message):
        D.read_depth_png(tmp_path / "depth.png", depth_scale=0.01)
    argv = ["embed", "--checkpoint", str(tiny_checkpoint), "--modality", "depth", "--depth-scale", "0.01",
            "--focal-length", "500", str(tmp_path / "depth.png")]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2 and re.match(rf"error: {message}", err)


def test_case_depth_not_one_channel_or_no_unit(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"depth image .*rgb\.png has 3 channels; expected one"):
        D.read_depth_png(tmp_path / "rgb.png", depth_scale=0.01)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "eight.png")
    with pytest.raises(ValueError, match=r"depth image .*eight\.png is 8-bit, which has no metric unit"):
        D.read_depth_png(tmp_path / "eight.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot read depth image .*bad\.png"):
        D.read_depth_png(tmp_path / "bad.png")


def test_case_imu_bad(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"rec\.npy must be \(6, T\) or \(T, 6\)"):
        D.transform_imu(np.zeros((5, 2000)), name="rec.npy")
    bad = np.zeros((6, 2000))
    bad[2, 7] = np.inf
    with pytest.raises(ValueError, match=r"rec\.npy contains NaN or infinite samples"):
        D.transform_imu(bad, name="rec.npy")
    with pytest.raises(ValueError, match=r"rec\.npy has 1999 samples, the model expects 2000"):
        D.transform_imu(np.zeros((1999, 6)), name="rec.npy")


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------


def clip_tokenizer(**kw) -> CLIPTokenizer:
    try:
        return CLIPTokenizer(find_bpe_vocab(), **kw)  # the real 49408-id vocabulary (test extra: open_clip_torch)
    except FileNotFoundError:
        pytest.skip("CLIP's vocabulary is not installed (pip install open_clip_torch)")


def test_case_text_too_long() -> None:
    """77 tokens with start and end fit; 78 are cut with one warning per call, or refused on request."""
    tok = clip_tokenizer()
    fits, over = "a " * 75, "a " * 76  # "a" is one token: 75 + start + end = 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert int((tok(fits) != 0).sum()) == 77
    with pytest.warns(UserWarning) as record:
        ids = tok([fits, over, "a dog " * 100, "a dog"])
    assert len(record) == 1
    assert str(record[0].message).startswith(
        "2 of 4 texts are longer than the context of 77 tokens and were cut (the end-of-text token kept); "
        "longest 202 tokens; first: text 1 ('a a a a a a a a a a a a a a a a a a a a '...) has 78 tokens"
    )
    assert ids.shape == (4, 77) and (ids[:3, -1] == tok.eot_id).all()
    with pytest.raises(TextTooLongError, match=r"text 1 .* has 78 tokens, more than the context of 77"):
        clip_tokenizer(too_long="error")([fits, over])


def test_case_text_too_long_cli(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    (tmp_path / "words.txt").write_text("a\ndog\n")
    base = ["embed", "--checkpoint", str(tiny_checkpoint), "--modality", "text", "--vocab", str(tmp_path / "words.txt")]
    long = "a dog a dog a dog a dog"  # 8 words + start + end = 10 > the tiny context of 8
    code, err = run_cli([*base, "--too-long-text", "error", long], capsys)
    assert code == 2 and err.startswith("error: text 0 ('a dog a dog a dog a dog'...) has 10 tokens, more than")
    with pytest.warns(UserWarning, match="1 of 1 texts are longer than the context of 8 tokens"):
        assert cli.main([*base, long]) == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_tokenizer_property_any_text(texts: list[str]) -> None:
    """Any text (control characters, lone surrogates, emoji, ...) gives start, body, end and padding; never
    an exception other than the documented TextTooLongError, never a row without its end-of-text token."""
    tok = _PROPERTY_TOKENIZER
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(texts)
    assert ids.shape == (len(texts), 77)
    for row in ids:
        # Id 0 is both the padding and a real token ("!"), so the end is found as the text head finds it.
        end = int(row.argmax())
        assert row[0] == tok.sot_id and row[end] == tok.eot_id and (row[end + 1 :] == 0).all()
    try:
        CLIPTokenizer.__call__(_PROPERTY_STRICT, texts)
    except TextTooLongError:
        pass


def _property_tokenizers() -> tuple[CLIPTokenizer | None, CLIPTokenizer | None]:
    try:
        path = find_bpe_vocab()
    except FileNotFoundError:
        return None, None
    return CLIPTokenizer(path), CLIPTokenizer(path, too_long="error")


_PROPERTY_TOKENIZER, _PROPERTY_STRICT = _property_tokenizers()
if _PROPERTY_TOKENIZER is None:
    test_tokenizer_property_any_text = pytest.mark.skip(reason="CLIP's vocabulary is not installed")(
        test_tokenizer_property_any_text
    )


def test_word_tokenizer_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="too_long must be 'warn' or 'error', got 'cut'"):
        WordTokenizer(["a"], 8, 16, too_long="cut")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def test_case_checkpoint_key_mismatch(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    from safetensors.torch import load_file

    state = load_file(str(tiny_checkpoint))
    state.pop("modality_heads.audio.2.weight")
    state["modality_heads.audio.9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "renamed.pth")  # an official-layout .pth with one key renamed
    argv = ["embed", "--checkpoint", str(tmp_path / "renamed.pth"), "--config", "tiny", "--modality", "audio", "x.wav"]
    (tmp_path / "x.wav").write_bytes(wav_bytes(0.5))
    argv[-1] = str(tmp_path / "x.wav")
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith(f"error: checkpoint {tmp_path / 'renamed.pth'} does not match the model:")
    assert "missing keys (1):\n    modality_heads.audio.2.weight" in err
    assert "unexpected keys (1):\n    modality_heads.audio.9.weight" in err


def test_case_checkpoint_unreadable(tmp_path: Path, capsys) -> None:
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    for name, why in (("junk.pth", "cannot read checkpoint"), ("junk.safetensors", "cannot read checkpoint"),
                      ("list.pth", "expected a state dict, got list")):  # fmt: skip
        code, err = run_cli(["embed", "--checkpoint", str(tmp_path / name), "--modality", "text", "a"], capsys)
        assert code == 2 and err.startswith("error: ") and why in err and name in err, err


class _Payload:
    """Unpickling this would create a file: the proof that the checkpoint's code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_case_checkpoint_pickle_payload(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "payload_ran"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": _Payload(marker)}, tmp_path / "evil.pth")
    code, err = run_cli(["embed", "--checkpoint", str(tmp_path / "evil.pth"), "--modality", "text", "a"], capsys)
    assert code == 2 and "evil.pth: refusing to unpickle type " in err and "--trust-pickle" in err, err
    assert not marker.exists()
    from mmr_imagebind.checkpoint import CheckpointReadError, read_state_dict

    with pytest.raises(CheckpointReadError, match="evil.pth: refusing to unpickle"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from test_train import write_pairs

    return write_pairs(tmp_path_factory.mktemp("shards"), n=16)


class _NaNAtCall:
    """The recipe's loss, but NaN at the ``bad``-th call (a diverging step)."""

    def __init__(self, bad: int, **kw) -> None:
        from mmr_core.losses import ContrastiveLoss

        self.loss, self.bad, self.calls = ContrastiveLoss(**kw), bad, 0

    def __call__(self, *args):
        self.calls += 1
        out = self.loss(*args)
        return out * float("nan") if self.calls == self.bad else out


def test_case_non_finite_loss(shards: str, tmp_path: Path, monkeypatch) -> None:
    from test_train import tiny_config

    from mmr_imagebind import train as train_module

    monkeypatch.setattr(train_module, "ContrastiveLoss", lambda **kw: _NaNAtCall(3, **kw))
    cfg = tiny_config(shards, tmp_path / "run", epochs=2, save_every=1)
    with pytest.raises(NonFiniteLossError) as err:
        train_module.train(cfg)
    assert err.value.step == 3 and len(err.value.sample_ids) == 8
    assert all(re.fullmatch(r"s\d{4}", k) for k in err.value.sample_ids)
    assert str(err.value).startswith("step 3: loss is nan for the batch of samples [s")
    # Stopped before the update: the newest checkpoint is step 2's, finite, and no final model was written.
    found = sorted((tmp_path / "run" / "checkpoints").glob("step*"))
    assert [p.name for p in found] == ["step000000001", "step000000002"]
    last = torch.load(found[-1] / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # Opt-in: drop that update, counted, and finish.
    skip = tiny_config(shards, tmp_path / "skip", epochs=2, on_non_finite="skip")
    result = train_module.train(skip)
    assert result["non_finite_skipped"] == 1 and result["steps"] == 4 and len(result["losses"]) == 4
    from safetensors.torch import load_file

    final = load_file(result["model_path"])  # (the text causal mask holds -inf by design: look for NaN)
    assert not any(torch.isnan(v).any() for v in final.values())


def test_case_resume_state_safe(shards: str, tmp_path: Path) -> None:
    """Our resume checkpoints load with weights_only=True (RNG states as tensors), and resuming uses that."""
    from test_train import tiny_config

    from mmr_imagebind.train import train

    cfg = tiny_config(shards, tmp_path / "run", epochs=2, stop_at_step=1)
    train(cfg)
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step*/state.pt")
    state = torch.load(ckpt, weights_only=True)["client_state"]["mmr"]
    assert isinstance(state["rng_states"][0]["numpy"][1], torch.Tensor) and state["step"] == 1
    cfg.stop_at_step = None
    assert train(cfg)["resumed_from"] == 1


# ----------------------------------------------------------------------------------------------------------
# The table in docs/bad-inputs.md
# ----------------------------------------------------------------------------------------------------------


def documented_cases() -> list[str]:
    text = (ROOT / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    section = text.split("\n## ImageBind\n", 1)[1].split("\n## ", 1)[0]
    rows = [m.group(1) for m in re.finditer(r"^\| ([a-z0-9_]+) \|", section, re.MULTILINE)]
    return [r for r in rows if r != "case"]  # the header row


def test_docs_table_matches_the_cases() -> None:
    tested = sorted(name.removeprefix("test_case_") for name in globals() if name.startswith("test_case_"))
    documented = documented_cases()
    assert len(documented) == len(set(documented)), f"duplicate rows in docs/bad-inputs.md: {documented}"
    assert sorted(documented) == tested, json.dumps({"documented": documented, "tested": tested}, indent=1)
