"""ImageBind model: parity with the official implementation, official key set, modality-only building."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmr_core.transformer import Transformer, TransformerConfig
from mmr_imagebind.checkpoint import (
    CheckpointMismatchError,
    config_from_safetensors,
    load_imagebind,
    load_official_checkpoint,
    load_state_dict_strict,
    save_safetensors,
)
from mmr_imagebind.encoders import ImageToVideoConv, pooled_last_block
from mmr_imagebind.evaluation import embed
from mmr_imagebind.model import MODALITIES, ImageBind, ImageBindConfig, build_imagebind, parameter_counts

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def parity():
    raw = load_file(str(FIXTURES / "parity_tiny.safetensors"))
    split = {"state": {}, "input": {}, "output": {}}
    for k, v in raw.items():
        group, name = k.split(".", 1)
        split[group][name] = v
    return split


@pytest.fixture(scope="module")
def tiny_model(parity):
    model = ImageBind(ImageBindConfig.from_name("tiny")).eval()
    load_state_dict_strict(model, parity["state"], "parity fixture")
    return model


@pytest.mark.parametrize(
    "name", ["vision", "vision_video", "vision_48px", "text", "audio", "audio_single", "depth", "thermal", "imu"]
)
def test_parity_with_official_outputs(parity, tiny_model, name: str) -> None:
    modality = name.split("_")[0]
    with torch.no_grad():
        ours = tiny_model.encode(modality, parity["input"][name])
    # The official operations in the same order; only the summation order inside GEMMs, convolutions and
    # SDPA may differ (kernels chosen by shape and CPU). Outputs are unit vectors times the logit scale
    # s <= 20. A reordered K-term dot product (K <= 384, the 3x2x8x8 vision patch) changes by about
    # sqrt(log2 K) u relative with blocked sums (rounding errors as independent, Higham 2nd ed. sec. 3.7),
    # and ~15 such stages follow each other (stem, 2 blocks x (2 LayerNorms, attention, MLP), head): a few
    # 10u of s, 1e-6 for s = 1 up to 4e-5 for s = 20, inside atol + rtol |x| = 1e-5 (1 + |x|) for the
    # components that carry the norm. Measured: 0.0 on the Intel Xeon that made the fixture, at most
    # 2.5e-6 (1.3e-7 of s) on an AMD EPYC.
    torch.testing.assert_close(ours, parity["output"][name], rtol=1e-5, atol=1e-5)


def test_forward_dict_and_multi_clip_average(parity, tiny_model) -> None:
    audio = parity["input"]["audio"]
    with torch.no_grad():
        out = tiny_model({"audio": audio, "text": parity["input"]["text"]})
        per_clip = torch.stack([tiny_model.encode("audio", audio[:, i]) for i in range(audio.shape[1])], 1)
    assert set(out) == {"audio", "text"}
    # Clips are averaged after normalisation and the fixed audio scale of 20.
    torch.testing.assert_close(out["audio"], per_clip.mean(1))
    torch.testing.assert_close(per_clip.norm(dim=-1), torch.full(per_clip.shape[:2], 20.0))


def test_modality_only_model_loads_fixture_subset(parity) -> None:
    model = ImageBind(ImageBindConfig.from_name("tiny"), modalities=["audio"]).eval()
    load_state_dict_strict(model, parity["state"])
    assert list(model.modality_trunks) == ["audio"]
    with torch.no_grad():
        torch.testing.assert_close(model.encode("audio", parity["input"]["audio"]), parity["output"]["audio"])
    with pytest.raises(KeyError, match="not built"):
        model.encode("vision", parity["input"]["vision"])


def test_official_pth_and_safetensors_roundtrip(parity, tiny_model, tmp_path: Path) -> None:
    pth = tmp_path / "official_layout.pth"
    torch.save(dict(parity["state"]), pth)
    model = load_official_checkpoint(ImageBind(ImageBindConfig.from_name("tiny")), pth).eval()
    st = tmp_path / "ours.safetensors"
    save_safetensors(model, st)
    assert config_from_safetensors(st).name == "tiny"
    loaded = load_imagebind(st, modalities=("text", "imu"))
    assert loaded.modalities == ("text", "imu")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode("imu", parity["input"]["imu"]), parity["output"]["imu"])
    # A wrapped, DataParallel-style re-save of the official file loads too (meta build, assign).
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in parity["state"].items()}}, wrapped)
    loaded = load_imagebind(wrapped, config="tiny", modalities=("text",))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode("text", parity["input"]["text"]), parity["output"]["text"])


def test_mismatch_error_names_keys(parity) -> None:
    state = dict(parity["state"])
    del state["modality_trunks.audio.blocks.0.attn.bias_k"]
    state["modality_heads.audio.9.weight"] = torch.zeros(1)
    state["modality_heads.vision.2.weight"] = torch.zeros(3, 3)
    model = ImageBind(ImageBindConfig.from_name("tiny"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_strict(model, state, "broken.pth")
    msg = str(err.value)
    assert "modality_trunks.audio.blocks.0.attn.bias_k" in msg and "missing keys (1)" in msg
    assert "modality_heads.audio.9.weight" in msg and "unexpected keys (1)" in msg
    assert "modality_heads.vision.2.weight: checkpoint (3, 3)" in msg


def test_imagebind_huge_matches_official_key_set_on_meta() -> None:
    with gzip.open(FIXTURES / "imagebind_huge_keys.json.gz", "rt") as f:
        official = json.load(f)
    model = build_imagebind("imagebind_huge", device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official["keys"]
    assert {k for k, _ in model.named_parameters()} == set(official["parameters"])
    counts = parameter_counts(model)
    expected = {m: 0 for m in MODALITIES}
    for k in official["parameters"]:
        expected[k.split(".")[1]] += int(torch.Size(official["keys"][k]).numel())
    assert counts == expected
    # Published sizes: a ViT-H vision tower (~632M) and the OpenCLIP ViT-H text tower (~354M); ~1.2B in all.
    assert 630e6 < counts["vision"] < 635e6 and 350e6 < counts["text"] < 357e6
    assert 1.19e9 < sum(counts.values()) < 1.21e9


def test_config_from_official_constructor_kwargs() -> None:
    # imagebind_huge() is the constructor with these overrides: every other field must come out as ours.
    huge = ImageBindConfig.from_official_kwargs(
        vision_embed_dim=1280, vision_num_blocks=32, vision_num_heads=16, text_embed_dim=1024,
        text_num_blocks=24, text_num_heads=16, out_embed_dim=1024, audio_drop_path=0.1, imu_drop_path=0.7,
    )
    assert huge.to_dict() == {**ImageBindConfig.from_name("imagebind_huge").to_dict(), "name": "official_custom"}
    plain = ImageBindConfig.from_official_kwargs(video_frames=4, kernel_size=(4, 16, 16))
    assert (plain.vision_embed_dim, plain.vision_num_blocks, plain.text_embed_dim, plain.out_embed_dim) == (
        1024, 24, 768, 768)
    assert (plain.vision_frames, plain.vision_kernel) == (4, (4, 16, 16))
    model = build_imagebind(plain, modalities=["vision"], device="meta")
    assert model.modality_trunks["vision"].blocks[0].attn.in_proj_weight.shape == (3 * 1024, 1024)
    with pytest.raises(ValueError, match="vision_width"):
        ImageBindConfig.from_official_kwargs(vision_width=10)


def test_official_kwargs_ignore_imu_kernel_size_like_the_constructor(caplog) -> None:
    # ImageBindModel(imu_kernel_size=10) still builds Linear(48, 512) over 8-sample windows (6 x 8 = 48).
    with caplog.at_level("WARNING"):
        cfg = ImageBindConfig.from_official_kwargs(imu_kernel_size=10)
    assert cfg.imu_kernel_size == 8 and "imu_kernel_size=10 ignored" in caplog.text
    model = build_imagebind(cfg, modalities=["imu"], device="meta")
    official_key = "modality_preprocessors.imu.imu_stem.proj.weight"
    assert model.state_dict()[official_key].shape == (512, 48)


def test_modality_only_build_is_small() -> None:
    audio_only = build_imagebind("imagebind_huge", modalities=["audio"], device="meta")
    assert parameter_counts(audio_only) == {"audio": 86235648}
    assert all(k.split(".")[1] == "audio" for k in audio_only.state_dict())


def test_input_errors(tiny_model) -> None:
    with pytest.raises(ValueError, match="IMU input must be"):
        tiny_model.encode("imu", torch.randn(2, 6, 63))
    with pytest.raises(ValueError, match="text must be"):
        tiny_model.encode("text", torch.randn(2, 8))
    with pytest.raises(ValueError, match="unknown modalities"):
        ImageBindConfig.from_name("tiny", modalities=("smell",))
    with pytest.raises(ValueError, match="unknown ImageBind config"):
        ImageBindConfig.from_name("imagebind_giant")


def test_other_resolution_interpolates_positions(tiny_model) -> None:
    with torch.no_grad():
        out = tiny_model.encode("vision", torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_postprocess_off_and_logit_scales(tiny_model) -> None:
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        raw = tiny_model.encode("thermal", x, postprocess=False)
        post = tiny_model.encode("thermal", x)
    torch.testing.assert_close(post, torch.nn.functional.normalize(raw, dim=-1) * 10.0)
    assert tiny_model.logit_scale("vision").item() == 1.0
    assert tiny_model.logit_scale("depth").item() == pytest.approx(5.0)
    assert tiny_model.modality_postprocessors["text"][1].log_logit_scale.requires_grad
    # Held as (1,) for DeepSpeed's parameter broadcast, saved with the official shape ().
    assert tiny_model.modality_postprocessors["text"][1].log_logit_scale.shape == (1,)
    assert tiny_model.state_dict()["modality_postprocessors.text.1.log_logit_scale"].shape == ()
    assert all(p.ndim > 0 for p in tiny_model.parameters())


def test_freeze_and_train_one_modality(parity) -> None:
    model = ImageBind(ImageBindConfig.from_name("tiny"), modalities=["vision", "text", "audio"])
    load_state_dict_strict(model, parity["state"])
    model.freeze(["vision", "text"]).train()
    model.set_gradient_checkpointing(True)
    audio = model.encode("audio", parity["input"]["audio"], postprocess=False)
    image = model.encode("vision", parity["input"]["vision"], postprocess=False)
    (audio * image).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".audio" not in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".audio." in n and "log_logit" not in n)


@pytest.mark.parametrize("causal,bias_kv,layer_scale", [(True, True, 0.5), (False, True, None), (True, False, None)])
def test_pooled_last_block_equals_full_block(causal: bool, bias_kv: bool, layer_scale: float | None) -> None:
    torch.manual_seed(0)
    cfg = TransformerConfig(16, 1, 2, causal=causal, add_bias_kv=bias_kv, layer_scale_init=layer_scale)
    block = Transformer(cfg).blocks[0].eval()
    x = torch.randn(3, 7, 16)
    pool = torch.tensor([0, 6, 3])
    with torch.no_grad():
        full = block(x, None, causal)[torch.arange(3), pool]
        got = pooled_last_block(block, x, pool, causal)
    assert got.shape == (3, 1, 16)
    # The same arithmetic for the pooled rows; GEMMs of 1 row instead of 7 may sum their K <= 64 terms
    # (MLP hidden width) in another order: <= 64 u = 4e-6 relative to the sum of |terms| in the worst case,
    # for outputs of size ~1 (randn inputs, LayerNorm), hence rtol 1e-5 and atol 1e-6 near zero.
    torch.testing.assert_close(got[:, 0], full, rtol=1e-5, atol=1e-6)


def test_inference_shortcuts_equal_the_plain_trunk(parity, tiny_model, monkeypatch) -> None:
    """Text runs only up to the batch's last end-of-text token (the parity test compares that with the
    official full-length run) and the last block only for the pooled token: outputs equal the full last
    block, and junk after the end-of-text token changes nothing."""
    inputs = {m: parity["input"][m] for m in ("audio", "imu", "vision")}
    inputs["text"] = text = parity["input"]["text"][[0, 1, 3]]  # the rows that end before the context length
    seen = []
    hook = tiny_model.modality_trunks["text"].blocks[0].register_forward_hook(
        lambda mod, args, out: seen.append(out.shape[1])
    )
    try:
        with torch.no_grad():
            fast = {m: tiny_model.encode(m, x) for m, x in inputs.items()}
            noisy = text.clone()
            noisy[noisy == 0] = 7  # junk after the end-of-text token (which holds the largest id)
            fast_noisy = tiny_model.encode("text", noisy)
            monkeypatch.setattr(ImageBind, "_pooled_inference", lambda self, trunk: False)
            plain = {m: tiny_model.encode(m, x) for m, x in inputs.items()}
    finally:
        hook.remove()
    assert seen[0] == int(text.argmax(-1).max()) + 1 < text.shape[1]  # the fast text run was truncated
    # Shorter sequences and a 1-row last block change only GEMM/SDPA summation order (K <= 384): the
    # parity test's bound (a few 10u of the logit scale <= 20) applies.
    for m in fast:
        torch.testing.assert_close(fast[m], plain[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_noisy, fast["text"], rtol=1e-5, atol=1e-5)


def test_vision_stem_folds_the_repeated_frames(tiny_model) -> None:
    """A still image repeated over one temporal kernel runs as a Conv2d with the kernel summed over time."""
    stem = tiny_model.modality_preprocessors["vision"].rgbt_stem.proj
    assert isinstance(stem, ImageToVideoConv)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        folded = stem(image)
        plain = stem[1](image.unsqueeze(2).repeat(1, 1, 2, 1, 1))  # the official repeat + Conv3d
        video = torch.randn(2, 3, 4, 32, 32)  # more frames than the kernel: the Conv3d path
        torch.testing.assert_close(stem(video), stem[1](video))
    assert folded.shape == plain.shape == (2, 16, 1, 4, 4)
    # conv2d(x, w0 + w1) vs conv3d summing w0 x + w1 x: the same 384 products grouped differently; randn
    # inputs and the tiny stem's weights give outputs of size ~1 and a worst-case regrouping error of
    # 384 u ~ 2.3e-5 of the sum of |terms| (~1e-6 realistic, sqrt(384) u): rtol 1e-5, atol 1e-6.
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)


@pytest.fixture
def eager_compile(monkeypatch):
    """``torch.compile`` with dynamo's eager backend: traces our code (graph breaks, guards) in seconds
    without inductor's C++ build; the inductor run itself is the slow test below."""
    calls = []
    real = torch.compile

    def eager_backend(graph, example_inputs):
        calls.append("graph")
        return graph.forward

    def fake(fn, **kwargs):
        calls.append(kwargs)
        return real(fn, backend=eager_backend, dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch, "compile", fake)
    return calls


def test_compile_option_plumbing(parity, eager_compile) -> None:
    torch._dynamo.reset()
    model = ImageBind(ImageBindConfig.from_name("tiny", text_context_length=40)).eval()
    state = {k: v for k, v in parity["state"].items() if "text" not in k}
    model.load_state_dict(state, strict=False)
    text = torch.zeros(3, 40, dtype=torch.long)
    text[:, :5] = torch.randint(1, 60, (3, 5))
    text[1, 17] = 63  # the end-of-text token (largest id) at position 17: 18 tokens -> bucket of 32
    text[[0, 2], 4] = 63
    lengths = []
    hook = model.modality_trunks["text"].blocks[0].register_forward_hook(lambda m, a, o: lengths.append(o.shape[1]))
    with torch.no_grad():
        for m, x in [("text", text), ("audio", parity["input"]["audio"]), ("vision", parity["input"]["vision"])]:
            # Dynamo's eager backend runs the same ATen ops; text is padded to 32 tokens (other GEMM shapes,
            # other summation order): the parity test's bound applies.
            torch.testing.assert_close(model.encode(m, x, compile=True), model.encode(m, x), rtol=1e-5, atol=1e-5)
        model.encode("imu", parity["input"]["imu"], postprocess=False, compile=True)
    hook.remove()
    assert lengths[:2] == [32, 18]  # compiled: a multiple of 16; eager: up to the last end-of-text token
    compiles = [c for c in eager_compile if c != "graph"]
    assert len(compiles) == 4 and all(c == {"dynamic": False} for c in compiles)
    assert set(model._compiled) == {("text", True), ("audio", True), ("vision", True), ("imu", False)}
    model.encode("imu", parity["input"]["imu"], postprocess=False, compile=True)
    assert len(eager_compile) == 8  # cached: no new compile, no new graph
    with torch.no_grad():  # more shapes than dynamo's default limit of 8 graphs per code object: all compiled
        for b in range(3, 9):
            model.encode("imu", parity["input"]["imu"][:1].expand(b, -1, -1), postprocess=False, compile=True)
    assert eager_compile.count("graph") == 10
    model.load_state_dict(model.state_dict())  # new weights: frozen copies are dropped
    assert not model._compiled
    # embed(compile=True) pads a short last batch so that the compiled encoder sees one batch shape.
    imu = parity["input"]["imu"].repeat(3, 1, 1)[:5]
    shapes = []
    hook = model.modality_trunks["imu"].register_forward_hook(lambda m, a, o: shapes.append(a[0].shape[0]))
    got = embed(model, "imu", imu, batch_size=2, compile=True)
    hook.remove()
    assert got.shape == (5, 16) and set(shapes) == {2}
    # A padded batch of 2 vs a batch of 1: only GEMM blocking differs (the parity test's bound).
    torch.testing.assert_close(got, embed(model, "imu", imu, batch_size=2), rtol=1e-5, atol=1e-5)
    model.train()
    assert not model._compiled
    with pytest.raises(ValueError, match="for inference"):
        model.encode("imu", parity["input"]["imu"], compile=True)


def test_copies_and_pickles_of_a_compiled_model_drop_its_compiled_encoders(eager_compile) -> None:
    """A compiled encoder closes over its own module: a deepcopy must not keep running the original's weights."""
    import copy
    import pickle

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ImageBind(ImageBindConfig.from_name("tiny")).eval()
    imu = torch.randn(2, 6, 64)
    with torch.no_grad():
        original = model.encode("imu", imu, compile=True)
        twin = copy.deepcopy(model)
        assert not twin._compiled and model._compiled
        for p in twin.modality_heads["imu"].parameters():
            p.add_(1.0)
        torch.testing.assert_close(twin.encode("imu", imu, compile=True), twin.encode("imu", imu))
        assert not torch.allclose(twin.encode("imu", imu, compile=True), original, atol=1e-3)
        restored = pickle.loads(pickle.dumps(model))
        # Eager (restored, uncompiled) vs the compiled original on the same weights: the parity test's bound.
        torch.testing.assert_close(restored.encode("imu", imu), original, rtol=1e-5, atol=1e-5)
    assert model._compiled  # the original keeps its own


@pytest.mark.slow
def test_compiled_inductor_matches_official_outputs(parity) -> None:
    """The real thing (inductor, frozen weights), about 10-40 s per modality on 2 cores."""
    torch._dynamo.reset()
    model = ImageBind(ImageBindConfig.from_name("tiny")).eval()
    load_state_dict_strict(model, parity["state"], "parity fixture")
    with torch.no_grad():
        for name in ["vision", "vision_video", "text", "audio", "depth", "thermal", "imu"]:
            got = model.encode(name.split("_")[0], parity["input"][name], compile=True)
            # Inductor fuses and reorders the same float32 sums: the eager parity test's bound.
            torch.testing.assert_close(got, parity["output"][name], rtol=1e-5, atol=1e-5)
