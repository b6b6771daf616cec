"""Evaluation helpers and the command line on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

from mmr_imagebind import cli
from mmr_imagebind.checkpoint import save_safetensors
from mmr_imagebind.evaluation import (
    cross_modal_retrieval,
    embed,
    embedding_arithmetic,
    load_inputs,
    zero_shot_classification,
)
from mmr_imagebind.model import ImageBind, ImageBindConfig, build_imagebind
from mmr_imagebind.tokenizer import WordTokenizer
from mmr_imagebind.zeroshot import mean_average_precision, text_classifier, zero_shot_logits

WORDS = ["a", "photo", "of", "the", "sound", "picture", "dog", "rain", "car"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = ImageBind(ImageBindConfig.from_name("tiny", modalities=("vision", "text", "audio"))).eval()
    ckpt = root / "tiny.safetensors"
    save_safetensors(model, ckpt)
    rng = np.random.default_rng(0)
    images, sounds = [], []
    for i in range(4):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(p)
        images.append(str(p))
        s = root / f"snd{i}.wav"
        sf.write(s, 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * np.arange(8000) / 16000), 16000)
        sounds.append(str(s))
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(WORDS))
    tok = WordTokenizer(WORDS, model.config.text_context_length, model.config.text_vocab_size)
    return model, ckpt, images, sounds, vocab, tok


def test_load_inputs_shapes_and_errors(setup, tmp_path: Path) -> None:
    model, _, images, sounds, *_ = setup
    cfg = model.config
    assert load_inputs("vision", images, cfg).shape == (4, 3, 32, 32)
    assert load_inputs("audio", sounds, cfg).shape == (4, 3, 1, cfg.audio_num_mel_bins, cfg.audio_target_len)
    np.save(tmp_path / "imu.npy", np.zeros((100, 6)))
    assert load_inputs("imu", [tmp_path / "imu.npy"], cfg).shape == (1, 6, cfg.imu_length)
    np.save(tmp_path / "depth.npy", np.ones((50, 60)))
    assert load_inputs("depth", [tmp_path / "depth.npy"], cfg).shape == (1, 1, 32, 32)
    # A 16-bit depth PNG (millimetres) with the camera's focal length: the same disparity as the .npy route.
    Image.fromarray(np.full((50, 60), 2000, np.uint16)).save(tmp_path / "depth.png")
    from_png = load_inputs("depth", [tmp_path / "depth.png"], cfg, focal_length_px=520.0)
    np.save(tmp_path / "disp.npy", np.full((50, 60), 0.075 * 520.0 / 2.0))
    # 19.5 px either way, up to the float32 rounding of 2000 x 0.001 (u relative, 6e-8), far inside
    # assert_close's float32 default (rtol 1.3e-6, atol 1e-5).
    torch.testing.assert_close(from_png, load_inputs("depth", [tmp_path / "disp.npy"], cfg))
    with pytest.raises(ValueError, match="focal length"):
        load_inputs("depth", [tmp_path / "depth.png"], cfg)
    np.save(tmp_path / "flat.npy", np.ones(3))
    with pytest.raises(ValueError, match="dimensions"):
        load_inputs("depth", [tmp_path / "flat.npy"], cfg)
    with pytest.raises(ValueError, match="unknown modality"):
        load_inputs("smell", [], cfg)


def test_zero_shot_classification_matches_direct_computation(setup) -> None:
    model, _, images, _, _, tok = setup
    x = load_inputs("vision", images, model.config)
    classes = ["dog", "rain", "car"]
    clf = text_classifier(model, tok, classes, ["a photo of a {}"])
    with torch.no_grad():
        logits = zero_shot_logits(model.encode("vision", x), clf)
    labels = logits.argmax(1)
    res = zero_shot_classification(model, tok, "vision", x, labels, classes, ["a photo of a {}"], batch_size=3)
    assert res == {"top1": 1.0, "top5": 1.0}
    wrong = zero_shot_classification(model, tok, "vision", x, (labels + 1) % 3, classes, ["a photo of a {}"])
    assert wrong["top1"] == 0.0
    multi = F.one_hot(labels, 3)
    res = zero_shot_classification(model, tok, "vision", x, multi, classes, ["a photo of a {}"])
    assert res["mAP"] == pytest.approx(mean_average_precision(logits, multi)) and res["top1_hit"] == 1.0


def test_retrieval_and_arithmetic_on_known_embeddings() -> None:
    a = torch.eye(6)
    r = cross_modal_retrieval(a, a + 0.01, names=("audio", "image"))
    assert r["audio->image R@1"] == 1.0 and r["image->audio R@10"] == 1.0
    shuffled = cross_modal_retrieval(a, a[[1, 0, 2, 3, 4, 5]], ks=(1, 5))
    assert shuffled["a->b R@1"] == pytest.approx(4 / 6) and shuffled["a->b R@5"] == 1.0
    image, audio = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 1.0, 0]])
    gallery = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0], [0, 0, 1.0]])
    idx, scores = embedding_arithmetic(image, audio, gallery, k=2)
    assert idx[0, 0] == 2 and scores[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ"):
        embedding_arithmetic(image, audio[:, :2], gallery)


def test_cli_embed_zeroshot_retrieve(setup, tmp_path: Path, capsys) -> None:
    model, ckpt, images, sounds, vocab, tok = setup
    out = tmp_path / "emb.safetensors"
    assert cli.main(["embed", "--checkpoint", str(ckpt), "--modality", "audio", "--out", str(out), *sounds]) == 0
    from safetensors.torch import load_file

    with torch.no_grad():
        direct = model.encode("audio", load_inputs("audio", sounds, model.config))
    torch.testing.assert_close(load_file(out)["embeddings"], direct)
    capsys.readouterr()

    classes = "dog,rain,car"
    args = ["zeroshot", "--checkpoint", str(ckpt), "--vocab", str(vocab), "--modality", "audio", "--classes", classes]
    assert cli.main([*args, *sounds]) == 0
    preds = [p["class"] for p in json.loads(capsys.readouterr().out)["predictions"]]
    assert cli.main([*args, "--labels", ",".join(preds), *sounds]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == 1.0

    assert cli.main(["retrieve", "--checkpoint", str(ckpt), "--vocab", str(vocab), "--query", "a photo of a dog",
                     "--gallery-modality", "vision", "--top-k", "3", *images]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)["results"][0]
    scores = [m["score"] for m in res["matches"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    with torch.no_grad():
        q = model.encode("text", tok(["a photo of a dog"]))
        g = embed(model, "vision", load_inputs("vision", images, model.config))
    assert res["matches"][0]["item"] == images[int(zero_shot_logits(q, g).argmax())]

    # User mistakes: "error: ..." on stderr and exit status 2.
    assert cli.main(["embed", "--checkpoint", str(ckpt), "--modality", "vision", str(tmp_path / "nope.png")]) == 2
    assert "error: input files not found" in capsys.readouterr().err
    assert cli.main([*args, "--labels", "dog", *sounds]) == 2
    assert "error: --labels needs one known class per input" in capsys.readouterr().err


def test_cli_config_file_of_official_constructor_kwargs(tmp_path: Path, capsys) -> None:
    """An official-layout .pth built with other ImageBindModel arguments runs from the CLI via --config FILE."""
    kwargs = {"imu_embed_dim": 16, "imu_num_blocks": 1, "imu_num_heads": 2, "out_embed_dim": 8}
    torch.manual_seed(0)
    model = build_imagebind(ImageBindConfig.from_official_kwargs(**kwargs), modalities=["imu"]).eval()
    ckpt = tmp_path / "custom.pth"
    torch.save(model.state_dict(), ckpt)
    imu = np.random.default_rng(0).standard_normal((6, 2000)).astype(np.float32)
    np.save(tmp_path / "imu.npy", imu)
    with torch.no_grad():
        direct = model.encode("imu", torch.from_numpy(imu)[None])
    (tmp_path / "custom.yaml").write_text("".join(f"{k}: {v}\n" for k, v in kwargs.items()))
    (tmp_path / "custom.json").write_text(json.dumps(kwargs))
    for config in ("custom.yaml", "custom.json"):
        out = tmp_path / f"{config}.safetensors"
        args = ["embed", "--checkpoint", str(ckpt), "--config", str(tmp_path / config), "--modality", "imu"]
        assert cli.main([*args, "--out", str(out), str(tmp_path / "imu.npy")]) == 0
        from safetensors.torch import load_file

        # The same module, weights and input: bit-identical.
        torch.testing.assert_close(load_file(out)["embeddings"], direct, rtol=0, atol=0)
    capsys.readouterr()
    base = ["embed", "--checkpoint", str(ckpt), "--modality", "imu", str(tmp_path / "imu.npy")]
    # Without the config the default imagebind_huge sizes do not fit the checkpoint: a clear error, status 2.
    assert cli.main(base) == 2
    assert "error:" in capsys.readouterr().err
    for name, text, message in [
        ("typo.yaml", "imu_embed_dims: 16\n", "takes no argument"),
        ("type.yaml", "imu_embed_dim: wide\n", "imu_embed_dim='wide' should be like 512"),
        ("list.yaml", "- imu_embed_dim\n", "must hold a mapping"),
        ("size.txt", "", "neither a named config"),
    ]:
        (tmp_path / name).write_text(text)
        assert cli.main([*base, "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and name in err, err
    assert cli.main([*base, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_compile_flag(setup, tmp_path: Path, monkeypatch) -> None:
    """``--compile`` reaches ``encode(compile=True)`` (dynamo's eager backend here; inductor is a slow test)."""
    _, ckpt, images, *_ = setup
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=kw.get("dynamic")))
    seen = []
    encode = ImageBind.encode
    monkeypatch.setattr(ImageBind, "encode", lambda self, *a, **kw: seen.append(kw) or encode(self, *a, **kw))
    outs = []
    for flag in ([], ["--compile"]):
        out = tmp_path / f"emb{len(flag)}.safetensors"
        args = ["embed", "--checkpoint", str(ckpt), "--modality", "vision", "--batch-size", "3", "--out", str(out)]
        assert cli.main([*args, *flag, *images]) == 0
        from safetensors.torch import load_file

        outs.append(load_file(out)["embeddings"])
    assert [kw["compile"] for kw in seen] == [False, False, True, True]  # 4 images in batches of 3, twice
    # Eager backend: the same ATen ops; the padded last batch (3 rows instead of 1) may change GEMM
    # blocking only, a reordering of K <= 384-term sums in unit vectors (vision, logit scale 1): ~sqrt(9) u
    # per dot product over ~15 stages, < 1e-6, well inside 1e-5.
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_cli_bfloat16_is_close_not_exact(setup, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, ckpt, _, sounds, *_ = setup
    outs = []
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.safetensors"
        args = ["embed", "--checkpoint", str(ckpt), "--modality", "audio", "--dtype", dtype, "--out", str(out)]
        assert cli.main([*args, *sounds]) == 0
        outs.append(load_file(out)["embeddings"])
    assert outs[1].dtype == torch.float32 and not torch.equal(outs[0], outs[1])
    assert F.cosine_similarity(outs[0], outs[1], dim=-1).min() > 0.99
    # Zero-shot with a bf16 model: bf16 class embeddings against float32 sample embeddings.
    vocab = setup[4]
    args = ["zeroshot", "--checkpoint", str(ckpt), "--vocab", str(vocab), "--modality", "audio", "--dtype", "bfloat16"]
    assert cli.main([*args, "--classes", "dog,rain,car", *sounds]) == 0
