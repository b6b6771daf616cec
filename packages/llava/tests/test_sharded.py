"""Sharded safetensors saves (as transformers writes them), lazy loading into a meta-built model, dtype and
device choice, the memory estimate, and the peak memory of loading."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open

from mmr_llava import checkpoint as ckpt
from mmr_llava.model import build_model, empty_model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# The tiny model holds 582 kB of float32 weights, its largest tensor 64 kB: 100 kB shards give about 7.
_SHARD = "100KB"


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_sharded_save_loads_bitwise(tmp_path, layout):
    model = build_model("tiny", seed=0)
    folder = ckpt.save_pretrained(model, tmp_path, layout=layout, max_shard_size=_SHARD)
    index = json.loads((folder / ckpt.SAFE_INDEX).read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and not (folder / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    sizes, keys = 0, set()
    for name in shards:
        assert (folder / name).stat().st_size <= ckpt.parse_shard_size(_SHARD) + 10_000  # + the JSON header
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                assert index["weight_map"][key] == name
                tensor = handle.get_tensor(key)
                sizes += tensor.numel() * tensor.element_size()
                keys.add(key)
    assert keys == set(index["weight_map"]) and index["metadata"]["total_size"] == sizes
    _same(model, ckpt.load_pretrained(folder))
    # Saving again in one file removes the shards and the index (they would be read beside it).
    ckpt.save_pretrained(model, folder, layout=layout)
    assert sorted(p.name for p in folder.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    _same(model, ckpt.load_pretrained(folder))


def test_shard_sizes_as_transformers_reads_them():
    assert ckpt.parse_shard_size("5GB") == 5 * 10**9 and ckpt.parse_shard_size("2GiB") == 2 * 2**30
    assert ckpt.parse_shard_size("500MB") == 5 * 10**8 and ckpt.parse_shard_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size '5 gigs'"):
        ckpt.parse_shard_size("5 gigs")


# Both sides run the same float32 modules on the same weights (eager attention); they can differ only where
# a kernel reorders a reduction: dot products of at most 128 terms of unit scale, worst-case rounding about
# 128 * 2**-24 ~ 8e-6 of the logits' scale (|logits| < 1 here), on any x86 BLAS. 1e-5 holds that.
_LOGIT_ATOL = 1e-5


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2"])
def test_transformers_reads_our_sharded_hf_folder(tmp_path, name):
    """The installed transformers' own from_pretrained reads our sharded HF-layout folder (index, shards,
    config; a tied lm_head left out as transformers leaves it out) and gives our logits."""
    ours = build_model(name, attn_implementation="eager", seed=3).eval()
    ckpt.save_pretrained(ours, tmp_path, layout="hf", max_shard_size=_SHARD)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tied = name == "tiny-qwen2"
    assert ("lm_head.weight" in json.loads((tmp_path / ckpt.SAFE_INDEX).read_text())["weight_map"]) != tied
    assert (theirs.lm_head.weight.data_ptr() == theirs.model.language_model.embed_tokens.weight.data_ptr()) == tied
    cfg = ours.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 12 + cfg.num_patches), generator=g)
    ids[:, 3:3 + cfg.num_patches] = cfg.image_token_index
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixels)["logits"], theirs(input_ids=ids, pixel_values=pixels).logits,
                                   rtol=0, atol=_LOGIT_ATOL)


def test_original_sharded_bin_release_loads(tmp_path):
    """The original's releases: pytorch_model-0000i-of-0000N.bin with pytorch_model.bin.index.json."""
    model = build_model("tiny", seed=1)
    ckpt.save_pretrained(model, tmp_path, layout="original")
    state = ckpt._read_weights(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, tmp_path / name)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not named by the index: never read")
    (tmp_path / ckpt.BIN_INDEX).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}))
    _same(model, ckpt.load_pretrained(tmp_path))


def test_dtype_device_and_memory_estimate(tmp_path):
    model = build_model("tiny", seed=0)
    ckpt.save_pretrained(model, tmp_path / "fp32", layout="original")
    lines = []
    half = ckpt.load_pretrained(tmp_path / "fp32", dtype="bfloat16", device="auto", report=lines.append)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in half.parameters()} | {b.device.type for b in half.buffers()} == {"cpu"}
    for name, tensor in model.state_dict().items():  # a cast of the float32 file, nothing else
        torch.testing.assert_close(half.state_dict()[name], tensor.to(torch.bfloat16), rtol=0, atol=0, msg=name)
    count, size = ckpt.weight_bytes(model, torch.bfloat16)
    assert count == sum(p.numel() for p in model.parameters()) and size == 2 * count
    assert lines == [f"{tmp_path / 'fp32'}: {count / 1e6:.2f}M parameters x 2 bytes (bfloat16) = "
                     f"{size / 2**20:.1f} MiB of weights on cpu"]
    # A bfloat16 save says so; "auto" loads it as bfloat16, bit for bit.
    ckpt.save_pretrained(half, tmp_path / "bf16", layout="hf")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _same(half, ckpt.load_pretrained(tmp_path / "bf16", dtype="auto"))
    # Converting keeps the checkpoint's dtype (a float16 release stays float16, not a float32 copy).
    ckpt.main([str(tmp_path / "bf16"), str(tmp_path / "bf16_original"), "--to", "original", "--max-shard-size", "100KB"])
    assert json.loads((tmp_path / "bf16_original" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "bf16_original" / ckpt.SAFE_INDEX).is_file()
    _same(half, ckpt.load_pretrained(tmp_path / "bf16_original", dtype="auto"))
    assert ckpt.checkpoint_dtype(tmp_path / "fp32") == torch.float32
    with pytest.raises(ValueError, match="dtype 'float64' is not one of"):
        ckpt.load_pretrained(tmp_path / "fp32", dtype="float64")
    with pytest.raises(ValueError, match="device 'tpu' is not cpu, cuda, cuda:N or auto"):
        ckpt.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            ckpt.resolve_device("cuda:0")


def test_empty_model_allocates_no_weights():
    from mmr_llava.model import LlavaConfig

    model = empty_model(LlavaConfig.from_name("llava-v1.5-7b"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (303.5M), projector (21.0M), LLaMA-7B (6738.4M).
    assert ckpt.weight_bytes(model, torch.float16) == (7_062_902_784, 2 * 7_062_902_784)
    assert ckpt.format_count(7_062_902_784) == "7.06B" and ckpt.format_count(582_272 // 4) == "0.15M"


_PEAK_SCRIPT = textwrap.dedent("""
    import math, sys, torch
    from mmr_llava import checkpoint as ckpt

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    ckpt.read_config(sys.argv[1])  # imports and config parsing before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = rss("VmRSS")
    model = ckpt.load_pretrained(sys.argv[1])
    # A float32 load keeps the tensors in the files' private memory maps (as transformers does): pages are
    # read when touched. Touch every weight, as a forward pass would, so that all of them count.
    # (a sum reads every element and allocates nothing of the tensor's size)
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())
    print(rss("VmHWM") - base, sum(p.numel() * p.element_size() for p in model.parameters()))
""")


@pytest.mark.slow
def test_peak_memory_of_loading_is_about_one_copy(tmp_path):
    """Loading a 513 MiB checkpoint in 50 MB shards raises the peak RSS by about the weights once: measured
    +522 MiB. The loader before meta-device building (random float32 weights, then every file's tensors
    copied in) measured +1034 MiB on the same files, single or sharded."""
    import dataclasses

    from mmr_llava.model import LlavaConfig

    tiny = LlavaConfig.from_name("tiny")
    cfg = dataclasses.replace(tiny, text=dict(tiny.text, hidden_size=1024, intermediate_size=4096,
                                              num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16,
                                              vocab_size=16000))
    model = build_model(cfg, seed=0)
    ckpt.save_pretrained(model, tmp_path, layout="original", max_shard_size="50MB")
    del model
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak, weights = map(int, out.stdout.split())
    print(f"weights {weights / 2**20:.0f} MiB, peak RSS increase while loading {peak / 2**20:.0f} MiB")
    # One copy of the weights (the mapped file pages), plus 64 MiB of slack (the small buffers built with the
    # model, allocator pages); two copies would be 1 GiB.
    assert weights > 300 * 2**20 and peak < weights + 64 * 2**20


def test_model_save_and_from_pretrained_with_a_hub_id_offline(tmp_path, monkeypatch):
    """``LlavaModel.save_pretrained`` / ``from_pretrained`` (the repository's convention): a folder, or a hub id
    resolved from a local Hugging Face cache made here, with ``HF_HUB_OFFLINE=1``."""
    from mmr_llava.model import LlavaModel

    model = build_model("tiny", seed=7)
    model.save_pretrained(tmp_path / "folder", layout="hf", max_shard_size=_SHARD)
    # The cache layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-llava"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model.save_pretrained(repo / "snapshots" / commit, layout="original")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _same(model, LlavaModel.from_pretrained(tmp_path / "folder"))
    _same(model, LlavaModel.from_pretrained("someone/tiny-llava", cache_dir=tmp_path / "cache"))
    # The commands take the hub id too (the default cache, pointed here).
    from mmr_llava.inference import load_for_inference
    from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

    train_tiny_tokenizer(["a red circle"], 64).save_pretrained(repo / "snapshots" / commit)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # read per call
    _same(model, load_for_inference("someone/tiny-llava", device="cpu")[0])
    from mmr_core.hub import PretrainedError

    with pytest.raises(PretrainedError, match="someone/other.*offline"):
        LlavaModel.from_pretrained("someone/other", cache_dir=tmp_path / "cache")
