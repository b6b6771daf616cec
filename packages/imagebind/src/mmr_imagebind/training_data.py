"""Training data of a binding run: (image, X) pairs read by position from local WebDataset shards.

Exact resume with any number of ranks and DataLoader workers needs every micro-batch to be a function of
its position only: ``(epoch, micro-batch index, rank)``. A streaming tar reader cannot promise that (its
order depends on how shards are split over workers), so the shards are read here as a map-style dataset:

1. :class:`ShardSamples` scans the tar headers of every shard once (no member data is read) and keeps
   each sample's members as ``(extension, byte offset, size)``. A missing shard, a truncated one or a
   compressed one is found here; what it lost is counted in samples (from the shard index written
   beside the shards, :mod:`mmr_core.data.shard_index`, else as "unknown"), once, at start.
2. :class:`PairBatches` is the run's data source for :func:`mmr_core.train.fit`: a
   :class:`mmr_core.train.MapStyleSource` over the epoch's ``steps_per_epoch x global batch`` positions. The
   recipe's sample replication makes an epoch longer than the data: :func:`replicated_order` fills it with
   shuffled whole passes, seeded by ``(seed, epoch)``. Each micro-batch is loaded under
   :func:`mmr_core.train.position_seeded`, and every sample's augmentation seed is drawn there, so two copies
   of one sample in an epoch are augmented differently and nothing depends on which worker loads what.
3. A sample that fails to decode or transform is replaced by a sample drawn at random (position-seeded, so
   micro-batches keep their size: the contrastive loss all-gathers equal shapes from every rank) and
   counted in the training process when its micro-batch is used (prefetched but unused batches never
   count): a :class:`mmr_core.data.SkipCounter` with its count and fraction limits, carried in checkpoints.

:class:`PairTransform` (decoded sample -> model inputs with the recipe's augmentations) also lives here.
"""

from __future__ import annotations

import functools
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from mmr_core.data import DecodeError, DecodeOptions, SkipCounter, TooManySkipsError, decode_sample, derive_seed
from mmr_core.data import expand_shards as _expand_shards
from mmr_core.data.shard_index import ShardInfo, find_shard_infos
from mmr_core.utils import get_logger

from . import data as T
from .model import ImageBindConfig
from .recipes import AugmentConfig, Recipe

log = get_logger(__name__)

_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def expand_shards(spec: str) -> list[str]:
    """The shard paths of a spec (brace pattern, glob, folder or ``::`` list); local files only.

    Raises:
        ValueError: A remote URL (``pipe:``, ``http(s)://``, ...): reading samples by position needs
            random access, so copy or mount the shards locally.
    """
    urls = _expand_shards(spec)
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        raise ValueError(
            f"training reads samples by position (exact resume with workers), which needs local tar files; "
            f"{remote[0]} is remote: copy or mount the shards locally"
        )
    return [u[len("file:") :] if u.startswith("file:") else u for u in urls]


def count_samples(shards: list[str]) -> int:
    """Number of samples a scan of the local tar shards finds (broken shards: their readable part)."""
    return len(ShardSamples(shards, SkipCounter(max_fraction=None)))


# ----------------------------------------------------------------------------------------------------------
# Random access to the samples of tar shards
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Scan:
    """One shard's readable samples: key and ``(extension, offset, size)`` members each, plus what broke."""

    keys: list[str]
    members: list[list[tuple[str, int, int]]]
    error: BaseException | None = None


def _compression(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(6)
    return next((name for magic, name in _COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def _has_end_marker(path: str, offset: int) -> bool:
    """True if the tar has its end-of-archive zero block at ``offset`` (right after the last member)."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and block.count(0) == 512


def _scan_shard(path: str, info: ShardInfo | None) -> _Scan:
    """Read the member headers of one uncompressed tar (seeking past the data) and group them by sample.

    Python's tar reader ends silently where a file stops at or inside a header, so the scan checks that
    every member's data lies inside the file and that the end-of-archive block follows the last member. At
    a cut, every member before it is whole; whether the last sample got all its members is settled by the
    shard index (as :mod:`mmr_core.data.pipeline` does), and without one that sample is dropped.
    """
    size = os.path.getsize(path)
    keys: list[str] = []
    members: list[list[tuple[str, int, int]]] = []
    error: BaseException | None = None
    try:
        with tarfile.open(path, "r:") as tf:
            while (member := tf.next()) is not None:
                if not member.isreg() or member.name.startswith("__") or "/__" in member.name:
                    continue
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None:
                    continue
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                if not keys or keys[-1] != prefix:
                    keys.append(prefix)
                    members.append([])
                suffix = suffix.lower()
                if any(ext == suffix for ext, _, _ in members[-1]):
                    raise tarfile.ReadError(f"duplicate member {member.name}")
                members[-1].append((suffix, member.offset_data, member.size))
            end = tf.offset
        if not _has_end_marker(path, end):
            raise tarfile.ReadError(f"no end-of-archive marker after byte {end}: shard is truncated")
    except (tarfile.TarError, OSError, EOFError) as e:
        error = e
        complete = info is not None and members and info.members_of(len(keys) - 1) == len(members[-1])
        if members and not complete:  # the sample at the cut may lack members: drop it
            keys.pop()
            members.pop()
    return _Scan(keys, members, error)


class ShardSamples:
    """The samples of local tar shards, addressed by index, read by byte ranges.

    Args:
        shards: Shard spec (see :func:`expand_shards`) or a list of local paths.
        skips: Where shard losses are counted (samples lost per reason; the fraction is of the samples the
            shards held). Default: a new :class:`SkipCounter` with its default limits.

    Raises:
        ValueError: A remote or compressed shard (random access needs an uncompressed local tar).
        TooManySkipsError: The lost samples exceed the counter's limits.
        FileNotFoundError: No readable sample at all.
    """

    def __init__(self, shards: str | list[str], skips: SkipCounter | None = None) -> None:
        self.urls = expand_shards(shards) if isinstance(shards, str) else list(shards)
        self.skips = skips if skips is not None else SkipCounter()
        infos = find_shard_infos(self.urls)
        keys: list[str] = []
        shard_of: list[int] = []
        starts: list[int] = [0]
        exts: list[str] = []
        offsets: list[int] = []
        sizes: list[int] = []
        losses: list[tuple[str, str, str | None, BaseException, int | None, int]] = []
        for u, url in enumerate(self.urls):
            info = infos.get(os.path.abspath(url))
            if not os.path.isfile(url):
                losses.append(("missing_shard", url, None, FileNotFoundError(url), info.samples if info else None, 0))
                continue
            kind = _compression(url)
            if kind is not None:
                raise ValueError(f"shard {url} is {kind}-compressed: training reads samples by byte offset, which "
                                 "needs uncompressed .tar shards (recompress-free: `gunzip` it, or rewrite with "
                                 "mmr_core.data.write_shards)")  # fmt: skip
            scan = _scan_shard(url, info)
            for key, mem in zip(scan.keys, scan.members, strict=True):
                keys.append(key)
                shard_of.append(u)
                for ext, offset, size in mem:
                    exts.append(ext)
                    offsets.append(offset)
                    sizes.append(size)
                starts.append(len(exts))
            got = len(scan.keys)
            if scan.error is None:
                self.skips.shard_complete(got)
                if info is not None and info.samples != got:
                    log.warning("shard %s has %d samples but its index says %d: the index is stale", url, got,
                                info.samples)  # fmt: skip
            elif info is None:
                losses.append(("corrupt_shard", url, None, scan.error, None, got))
            elif info.samples > got:
                losses.append(("corrupt_shard", url, None, scan.error, info.samples - got, 0))
            else:  # only the end-of-archive block is missing: every sample was read
                log.warning("shard %s: %s; all its %d samples were read", url, scan.error, got)
                self.skips.shard_complete(got)
        self.keys = keys
        self._shard = np.asarray(shard_of, dtype=np.int32)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._exts = exts
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        # The fraction limit judges lost samples against all the shards held: count the readable ones first.
        self.skips.delivered(len(keys))
        for reason, url, key, err, lost, read_before in losses:
            self.skips.skip(reason, url, key, err, lost=lost, read_before=read_before)
        if not keys:
            raise FileNotFoundError(f"no readable sample in the {len(self.urls)} shard(s) {self.urls[:3]}")
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"], state["skips"] = {}, None  # file descriptors and the counter stay in their process
        return state

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # a forked worker: descriptors of the parent are not ours to share
            self._fds, self._pid = {}, os.getpid()
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def url_of(self, index: int) -> str:
        """The shard sample ``index`` is in."""
        return self.urls[int(self._shard[index])]

    def raw(self, index: int) -> dict[str, Any]:
        """Sample ``index`` as a shard reader yields it: ``{"__key__", "__url__", extension: bytes, ...}``."""
        url = self.url_of(index)
        fd = self._fd(url)
        out: dict[str, Any] = {"__key__": self.keys[index], "__url__": url}
        for m in range(int(self._starts[index]), int(self._starts[index + 1])):
            data = os.pread(fd, int(self._sizes[m]), int(self._offsets[m]))  # no shared file offset
            if len(data) != self._sizes[m]:
                raise OSError(f"{url}: member {self.keys[index]}.{self._exts[m]} ended early (file changed?)")
            out[self._exts[m]] = data
        return out

    def close(self) -> None:
        """Close this process's file descriptors."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


# ----------------------------------------------------------------------------------------------------------
# Per-sample transform with the recipe's augmentations
# ----------------------------------------------------------------------------------------------------------


def frequency_mask(fbank: torch.Tensor, max_width: int, generator: torch.Generator) -> torch.Tensor:
    """SpecAugment frequency masking: zero one band of up to ``max_width`` mel bins (``(..., M, T)``)."""
    if max_width <= 0:
        return fbank
    mel = fbank.shape[-2]
    width = int(torch.randint(0, min(max_width, mel) + 1, (), generator=generator))
    start = int(torch.randint(0, mel - width + 1, (), generator=generator))
    out = fbank.clone()
    out[..., start : start + width, :] = 0.0
    return out


def _spatial_augment(image, partner: torch.Tensor | None, aug: AugmentConfig, size: int, gen: torch.Generator):
    """RandomResizedCrop + flip applied identically to a PIL image and an optional (C, H, W) partner."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms import functional as TF

    interp = TF.InterpolationMode.BICUBIC if aug.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    src_h, src_w = image.height, image.width
    i, j, h, w = RandomResizedCrop.get_params(image, scale=list(aug.crop_scale), ratio=[3 / 4, 4 / 3])
    image = TF.resized_crop(image, i, j, h, w, [size, size], interp)
    if partner is not None:  # the same box in the partner's own resolution
        sy, sx = partner.shape[-2] / src_h, partner.shape[-1] / src_w
        box = (round(i * sy), round(j * sx), max(1, round(h * sy)), max(1, round(w * sx)))
        partner = TF.resized_crop(partner, *box, [size, size], TF.InterpolationMode.BILINEAR, antialias=True)
    if float(torch.rand((), generator=gen)) < aug.hflip:
        image = TF.hflip(image)
        partner = TF.hflip(partner) if partner is not None else None
    return image, partner


class PairTransform:
    """Decoded shard sample -> ``(image (3, S, S), X)`` model inputs, with the recipe's augmentations.

    Randomness comes from a generator (and a forked global RNG for torchvision's transforms) seeded by the
    ``seed`` argument of the call, or by ``(seed, epoch, sample key)`` without one: the same draw always
    gives the same augmentation, whatever happened before, which makes resuming exact.

    Args:
        recipe: Augmentations and the bound modality.
        mcfg: Model config (input sizes).
        seed: Base seed.
        train: Augment (``False``: the deterministic evaluation transform).
    """

    def __init__(self, recipe: Recipe, mcfg: ImageBindConfig, seed: int = 0, train: bool = True) -> None:
        self.recipe, self.mcfg, self.seed, self.train = recipe, mcfg, seed, train
        self.epoch = 0

    def _image(self, img, partner, gen: torch.Generator):
        from torchvision import transforms

        aug, size = self.recipe.augment, self.mcfg.vision_image_size
        if self.train and aug.random_resized_crop:
            img, partner = _spatial_augment(img, partner, aug, size, gen)
            if aug.color_jitter:
                c = aug.color_jitter
                img = transforms.ColorJitter(c, c, c)(img)
            if aug.randaugment_ops:
                img = transforms.RandAugment(aug.randaugment_ops, aug.randaugment_magnitude)(img)
        x = T.vision_transform(size)(img)
        if self.train and aug.random_erase:
            x = transforms.RandomErasing(p=aug.random_erase)(x)
        return x, partner

    def __call__(self, sample: dict[str, Any], seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform one decoded sample.

        Args:
            sample: ``{"__key__", "image", <modality>, ...}`` as :func:`mmr_core.data.decode_sample` gives it.
            seed: Seed of this draw's augmentation (default: derived from ``(seed, epoch, key)``).
        """
        m, mc = self.recipe.modality, self.mcfg
        key = str(sample.get("__key__"))
        s = derive_seed("augment", self.seed, self.epoch, key) if seed is None else seed
        gen = torch.Generator().manual_seed(s)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)  # torchvision's random transforms draw from the global generator
            if "image" not in sample or m not in sample:
                raise KeyError(f"sample {key} needs 'image' and {m!r}, has {sorted(sample)}")
            partner = sample[m] if m in ("depth", "thermal") else None
            if m == "depth":  # metric disparity; Omnivore's SUN RGB-D transform runs DepthNorm before cropping
                partner = T.depth_norm(torch.as_tensor(partner).float())
            image, partner = self._image(T.load_image(sample["image"]), partner, gen)
            if m == "audio":
                x = self._audio(sample["audio"], int(sample["sample_rate"]), gen)
            elif m in ("depth", "thermal"):
                size = getattr(mc, f"{m}_image_size")
                p = partner[0] if partner.ndim == 3 else partner
                x = T.transform_depth(p, size, normalize=False)
                if m == "depth":
                    x = (x - T.DEPTH_MEAN) / T.DEPTH_STD
                if self.train and self.recipe.augment.random_erase:
                    from torchvision import transforms

                    x = transforms.RandomErasing(p=self.recipe.augment.random_erase)(x)
            elif m == "imu":
                x = T.transform_imu(sample["imu"], length=mc.imu_length, fit_length=True, name=key)
            else:
                raise ValueError(f"no transform for modality {m!r}")
        return image, x

    def _audio(self, wav: torch.Tensor, sr: int, gen: torch.Generator) -> torch.Tensor:
        """One random clip of ``audio_target_len`` frames in training (time shift); all clips otherwise."""
        mc = self.mcfg
        seconds = mc.audio_target_len * T.AUDIO_FRAME_SHIFT_MS / 1000
        if self.train:
            wav = wav.mean(0, keepdim=True) if wav.ndim == 2 else wav[None]
            n = int(round(seconds * sr))
            if wav.shape[-1] > n:
                start = int(torch.randint(0, wav.shape[-1] - n + 1, (), generator=gen))
                wav = wav[..., start : start + n]
            x = T.transform_audio(wav, sr, clips=1, clip_duration=seconds, num_mel_bins=mc.audio_num_mel_bins,
                                  target_length=mc.audio_target_len)[0]  # fmt: skip
            return frequency_mask(x, self.recipe.augment.frequency_masking, gen)
        return T.transform_audio(wav, sr, clip_duration=seconds, num_mel_bins=mc.audio_num_mel_bins,
                                 target_length=mc.audio_target_len)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The data source of the training loop
# ----------------------------------------------------------------------------------------------------------


def replicated_order(num_samples: int, positions: int, seed: int, epoch: int) -> list[int]:
    """Sample index at every position of an epoch: shuffled whole passes over the samples, concatenated, cut.

    The recipe's sample replication makes an epoch longer than the data; whole passes (rather than one
    shuffle of the replicated list) keep the copies of a sample apart, so a contrastive batch holds a sample
    twice only where two passes meet.
    """
    passes = math.ceil(positions / num_samples)
    order: list[int] = []
    for p in range(passes):
        generator = torch.Generator().manual_seed(derive_seed("order", seed, epoch, p))
        order += torch.randperm(num_samples, generator=generator).tolist()
    return order[:positions]


class _LoadPairs:
    """``load(indices)`` of :class:`mmr_core.train.MapStyleSource`: read, decode, transform, collate.

    Runs in DataLoader workers under :func:`mmr_core.train.position_seeded`, so every draw here (each
    sample's augmentation seed, replacements) depends on the micro-batch's position only. A sample that
    fails is reported in ``"failed"`` (the training process counts it) and replaced by a sample drawn at
    random, so every micro-batch keeps its size: the contrastive loss all-gathers equal shapes from every
    rank, as the streaming reader's refilled batches gave before.

    Args:
        samples: The shards' samples.
        transform: Decoded sample -> ``(image, X)``.
        max_tries: Replacements tried per failed position before the micro-batch is given up.
    """

    def __init__(self, samples: ShardSamples, transform: PairTransform, max_tries: int = 10) -> None:
        self.samples, self.transform, self.max_tries = samples, transform, max_tries

    def _load(self, index: int, seed: int, failed: list) -> tuple[torch.Tensor, torch.Tensor] | None:
        modality = self.transform.recipe.modality
        key, url = self.samples.keys[index], self.samples.url_of(index)
        try:
            sample = decode_sample(self.samples.raw(index), DecodeOptions(image="pil"))
        except (DecodeError, OSError) as e:
            failed.append((getattr(e, "reason", "corrupt_shard"), url, key, f"{type(e).__name__}: {e}"))
            return None
        if "image" not in sample or modality not in sample:
            failed.append(("missing_field", url, key, f"needs 'image' and {modality!r}, has {sorted(sample)}"))
            return None
        try:
            return self.transform(sample, seed=seed)
        except Exception as e:  # noqa: BLE001 - e.g. a degenerate recording: skip the sample, counted
            failed.append(("transform", url, key, f"{type(e).__name__}: {e}"))
            return None

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        seeds = torch.randint(0, 2**62, (len(indices),)).tolist()  # position-seeded: one draw per position
        images, xs, keys, failed = [], [], [], []
        for index, seed in zip(indices, seeds, strict=True):
            pair = self._load(index, seed, failed)
            for _ in range(self.max_tries if pair is None else 0):
                index = int(torch.randint(0, len(self.samples), ()))
                if (pair := self._load(index, seed, failed)) is not None:
                    break
            if pair is None:  # the training process raises, with the skip counts
                return {"batch": None, "samples": 0, "tokens": None, "ids": [], "failed": failed}
            images.append(pair[0])
            xs.append(pair[1])
            keys.append(self.samples.keys[index])
        return {"batch": (torch.stack(images), torch.stack(xs)), "samples": len(keys), "tokens": None, "ids": keys,
                "failed": failed}  # fmt: skip


class PairBatches:
    """The training loop's data source: micro-batches of (image, X) pairs by position (exact resume).

    A :class:`mmr_core.train.MapStyleSource` over the epoch's positions (``steps_per_epoch x global batch``,
    :func:`replicated_order`), plus the counting of samples that failed to load, done here in the training
    process as each micro-batch is used (prefetched but unused micro-batches never count).

    Args:
        samples: The shards' samples.
        transform: Decoded sample -> ``(image, X)``; called with a per-sample seed.
        micro_batch_size: Samples per micro-batch and rank.
        grad_accum: Micro-batches per optimizer step.
        steps_per_epoch: Optimizer steps per epoch.
        seed: Base seed of the order and the augmentation.
        rank: This process's rank.
        world: Number of ranks.
        num_workers: DataLoader worker processes (any number gives the same batches).
        skips: Counts the samples that fail to decode or transform (limits included); default a new one.
    """

    def __init__(
        self,
        samples: ShardSamples,
        transform: PairTransform,
        micro_batch_size: int,
        grad_accum: int,
        steps_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        skips: SkipCounter | None = None,
    ) -> None:
        from mmr_core.train import MapStyleSource

        positions = steps_per_epoch * micro_batch_size * grad_accum * world
        self.samples = samples
        self.skips = skips if skips is not None else SkipCounter()
        self.source = MapStyleSource(
            positions, _LoadPairs(samples, transform), micro_batch_size, grad_accum=grad_accum, seed=seed,
            rank=rank, world=world, num_workers=num_workers,
            order=functools.partial(replicated_order, len(samples), positions, seed),
        )  # fmt: skip
        self.steps_per_epoch = self.source.steps_per_epoch
        assert self.steps_per_epoch == steps_per_epoch, (self.steps_per_epoch, steps_per_epoch)

    def micro_batches(self, epoch: int, first: int) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches of ``epoch`` from micro-batch ``first`` on.

        Yields:
            ``{"batch": (images, xs), "samples": n, "tokens": None, "ids": sample keys}``.

        Raises:
            TooManySkipsError: Skipped samples exceed the counter's limits, or a whole micro-batch failed.
        """
        for item in self.source.micro_batches(epoch, first):
            for reason, url, key, message in item.pop("failed"):
                self.skips.skip(reason, url, key, message)
            self.skips.delivered(item["samples"])
            if item["batch"] is None:
                raise TooManySkipsError(f"a micro-batch of epoch {epoch} could not be filled: a sample and "
                                        f"its replacements all failed to load; {self.skips.summary()}")  # fmt: skip
            yield item

    def skip_summary(self) -> str:
        """Samples lost with broken shards (counted once, at the scan) and samples skipped while training."""
        return f"shards: {self.samples.skips.summary()}; training reads: {self.skips.summary()}"

    def state_dict(self) -> dict[str, Any]:
        """The read-skip counts, so that a resumed run's counts and limits continue from the saved ones."""
        return {"counts": torch.tensor(self.skips.state_dict()["counts"], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counts."""
        self.skips.load_state_dict(state)


__all__ = [
    "PairBatches",
    "PairTransform",
    "ShardSamples",
    "count_samples",
    "expand_shards",
    "frequency_mask",
    "replicated_order",
]
