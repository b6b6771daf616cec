"""MedVLM's bad-input matrix (issue #17): each case asserts the exact outcome, error text or skip counter.

One test per case, named ``test_case_<name>``; ``docs/bad-inputs.md`` has one MedVLM row per case with the
same name, and :func:`test_docs_table_matches_the_cases` keeps the two in step.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmr_core.data import TooManySkipsError
from mmr_core.guards import NonFiniteLossError
from mmr_core.io import RecordError, UntrustedCheckpointError, safe_torch_load
from mmr_medvlm.data import CocoGroundingDataset, sample_k_shot
from mmr_medvlm.evaluate import evaluate
from mmr_medvlm.model import GLIP, Detections, GLIPConfig
from mmr_medvlm.prompts import PromptSet
from mmr_medvlm.train import TrainConfig, batches, fit

DOCS = Path(__file__).resolve().parents[3] / "docs" / "bad-inputs.md"
PROMPT = PromptSet.from_names({"platelet": "platelet", "rbc": "red blood cell", "wbc": "white blood cell"})
SIZE = 32


def _coco(n_images: int = 4) -> dict:
    """A valid COCO dict: ``n_images`` 32x32 images, two boxes each, categories 1..3."""
    coco = {"images": [], "annotations": [],
            "categories": [{"id": 1, "name": "platelet"}, {"id": 2, "name": "rbc"}, {"id": 3, "name": "wbc"}]}
    for i in range(1, n_images + 1):
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE})
        for j, cat in enumerate((1 + i % 3, 1 + (i + 1) % 3)):
            coco["annotations"].append({"id": 10 * i + j, "image_id": i, "category_id": cat,
                                        "bbox": [2.0 + 8 * j, 3.0, 10.0, 12.0], "iscrowd": 0})
    return coco


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Image files for :func:`_coco` (random 8-bit RGB), plus the odd modes the cases use."""
    root = tmp_path_factory.mktemp("medvlm-bad")
    rng = np.random.default_rng(0)
    for i in range(1, 9):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _one_image(root: Path, file_name: str) -> CocoGroundingDataset:
    coco = _coco(1)
    coco["images"][0]["file_name"] = file_name
    return CocoGroundingDataset(coco, root, PROMPT)


def _raises(coco: dict, root: Path, pattern: str, cause: str) -> None:
    with pytest.raises(RecordError, match=pattern) as info:
        CocoGroundingDataset(coco, root, PROMPT)
    assert info.value.cause == cause


# -- annotation records --------------------------------------------------------------------------------------------
def test_case_bbox_nan(root):
    coco = _coco()
    coco["annotations"][0]["bbox"] = [float("nan"), 10, float("nan"), 20]  # the box, once kept as "clipped"
    _raises(coco, root, r"^<annotations>:annotation 10: bbox: entry 0 is nan, expected a list of 4 finite numbers$",
            "bad_value")
    ds = CocoGroundingDataset(coco, root, PROMPT, on_bad_record="skip", max_bad_fraction=0.2)
    assert ds.stats.clipped == 0 and ds.stats.skipped == {"bad_value": 1} and ds.stats.annotations == 7
    assert all(torch.isfinite(ds[i].targets.boxes).all() for i in range(len(ds)))


def test_case_bbox_nan_in_a_file(root, tmp_path):
    coco = _coco()
    coco["annotations"][3]["bbox"][2] = float("inf")
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))  # Python writes the non-standard Infinity literal; json reads it back
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:annotation 21: bbox: entry 2 is inf, "):
        CocoGroundingDataset(path, root, PROMPT)


def test_case_bbox_three_numbers(root):
    coco = _coco()
    coco["annotations"][2]["bbox"] = [1, 2, 3]
    _raises(coco, root, r"^<annotations>:annotation 20: bbox: has 3 numbers \[1, 2, 3\], "
                        r"expected a list of 4 finite numbers$", "wrong_type")


def test_case_bbox_wrong_types(root):
    coco = _coco()
    coco["annotations"][1]["bbox"] = [1, "2", 3, 4]
    _raises(coco, root, r"annotation 11: bbox: entry 1 is a string '2', expected a list of 4 finite numbers$",
            "wrong_type")
    coco = _coco()
    del coco["annotations"][1]["bbox"]
    _raises(coco, root, r"annotation 11: bbox: missing, expected a list of 4 finite numbers$", "missing_field")
    coco = _coco()
    coco["annotations"][1]["category_id"] = True
    _raises(coco, root, r"annotation 11: category_id: is a boolean True, expected an integer$", "wrong_type")


def test_case_unknown_ids(root):
    coco = _coco()
    coco["annotations"][0]["category_id"] = 9
    _raises(coco, root, r"annotation 10: category_id: 9 is not among the dataset's categories, "
                        r"expected one of \[1, 2, 3\]$", "bad_value")
    coco = _coco()
    coco["annotations"][0]["image_id"] = 99
    _raises(coco, root, r"annotation 10: image_id: 99 is not the id of an image in this file, ", "bad_value")


def test_case_k_shot_record():
    coco = _coco()
    del coco["annotations"][3]["category_id"]
    with pytest.raises(RecordError, match=r"^<annotations>:annotation 21: category_id: missing, expected an integer$"):
        sample_k_shot(coco, 1, seed=0)  # once a bare KeyError: 'category_id'


def test_case_class_name_punctuation(root):
    coco = _coco()
    coco["categories"][1]["name"] = ","
    _raises(coco, root, r"^<annotations>:category 2: name: ',' has no letter or digit, "
                        r"expected a class name a prompt can name$", "bad_value")
    coco["categories"][1]["name"] = "platelet"
    _raises(coco, root, r"category 2: name: 'platelet' is used twice, expected unique category names$", "bad_value")
    with pytest.raises(ValueError, match=r"class name ',' of category 'rbc' has no letter or digit"):
        PromptSet.from_names({"platelet": "platelet", "rbc": ","})


def test_case_image_record(root):
    coco = _coco()
    coco["images"][1]["width"] = 0
    _raises(coco, root, r"^<annotations>:image 2: width: is 0, expected a positive integer$", "bad_value")
    coco = _coco()
    del coco["annotations"]
    _raises(coco, root, r"^<annotations>:<document>: annotations: missing, expected a list of COCO records$",
            "missing_field")


def test_case_skip_mode(root):
    coco = _coco(8)
    coco["images"][0]["file_name"] = ""  # image 1 and its two annotations go
    coco["annotations"][4]["bbox"] = [1, 2]
    ds = CocoGroundingDataset(coco, root, PROMPT, on_bad_record="skip", max_bad_fraction=0.1)
    assert ds.stats.skipped == {"bad_value": 1, "wrong_type": 1} and ds.stats.dropped_with_image == 2
    assert len(ds) == 7 and ds.stats.annotations == 16 - 3
    assert "skipped 2 bad records (wrong_type=1, bad_value=1) and 2 annotations of skipped images" \
        in ds.stats.summary()
    # evaluation's ground truth is exactly what was kept
    assert {a["id"] for a in ds.coco["annotations"]} == {a["id"] for a in coco["annotations"]} - {10, 11, 30}
    with pytest.raises(TooManySkipsError, match=r"2 of 22 records skipped \(9.1%\) exceeds max_fraction=5.0%"):
        CocoGroundingDataset(coco, root, PROMPT, on_bad_record="skip")


# -- annotation files --------------------------------------------------------------------------------------------
def test_case_file_encoding(root, tmp_path):
    text = json.dumps(_coco()).replace('"rbc"', '"r\u00e9c"')
    (tmp_path / "latin1.json").write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(RecordError, match=rf"latin1\.json:line 1: encoding: byte 0xe9 at byte offset {offset} is "
                                          r"not valid UTF-8, expected UTF-8 text"):
        CocoGroundingDataset(tmp_path / "latin1.json", root, PROMPT)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(_coco()).encode())
    assert len(CocoGroundingDataset(tmp_path / "bom.json", root, PROMPT)) == 4
    (tmp_path / "cut.json").write_text(json.dumps(_coco())[:-30])
    with pytest.raises(RecordError, match=r"cut\.json:line 1: json: .*, expected a valid JSON document"):
        CocoGroundingDataset(tmp_path / "cut.json", root, PROMPT)


# -- image files ------------------------------------------------------------------------------------------------------
def _ramp16() -> np.ndarray:
    return np.linspace(0, 60000, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_case_image_16bit(root, suffix):
    Image.fromarray(_ramp16()).save(root / f"ramp16.{suffix}")
    image = _one_image(root, f"ramp16.{suffix}")[0].image
    # every channel is round(v / 257) / 255: the ramp's top is 233/255, not the 99.6 % white PIL's RGB gave
    want = torch.from_numpy(np.rint(_ramp16() / 257.0).astype(np.float32) / 255.0)
    assert torch.equal(image, want.expand(3, -1, -1))
    assert image.max().item() == pytest.approx(233 / 255) and (image == 1).float().mean() == 0


def test_case_image_float_tiff(root):
    unit = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    Image.fromarray(unit).save(root / "unit.tif")
    image = _one_image(root, "unit.tif")[0].image
    want = torch.from_numpy(np.rint(unit.astype(np.float64) * 255).astype(np.float32) / 255.0)
    assert torch.equal(image, want.expand(3, -1, -1))  # once all ~0 (values 0..1 read as levels 0..1 of 255)


def test_case_image_modes(root):
    rgb = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(8)
    palette.save(root / "palette.png")
    lut = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)
    assert torch.equal(_one_image(root, "palette.png")[0].image,
                       torch.from_numpy(lut[np.asarray(palette)].astype(np.float32) / 255).permute(2, 0, 1))
    Image.fromarray(np.dstack([rgb, rgb[..., 0]]), "RGBA").save(root / "rgba.png")
    assert torch.equal(_one_image(root, "rgba.png")[0].image,
                       torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1))  # alpha dropped


def test_case_image_unreadable(root):
    (root / "cut.png").write_bytes((root / "1.png").read_bytes()[:100])
    with pytest.raises(RecordError, match=r"^<annotations>:image 1: file_name: .*cut\.png cannot be read "
                                          r"\(.*\), expected an image file PIL can read$") as info:
        _one_image(root, "cut.png")[0]
    assert info.value.cause == "decode_image"
    with pytest.raises(FileNotFoundError, match=r"<annotations>:image 1: file_name: .*nope\.png does not exist"):
        _one_image(root, "nope.png")[0]
    Image.fromarray(np.zeros((SIZE, SIZE + 1, 3), np.uint8)).save(root / "wide.png")
    with pytest.raises(RecordError, match=r"image 1: width/height: the file .*wide\.png is 33x32, "
                                          r"expected 32x32 as the record says$"):
        _one_image(root, "wide.png")[0]


# -- evaluation ------------------------------------------------------------------------------------------------------
class _OneBoxPerImage:
    """Detects one fixed box of class 0 in every image."""

    def detect(self, images, prompt):
        return [Detections(torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([0.9]), torch.tensor([0]))
                for _ in images]


def test_case_eval_no_ground_truth(root):
    coco = _coco()
    coco["annotations"] = []
    metrics = evaluate(_OneBoxPerImage(), CocoGroundingDataset(coco, root, PROMPT))
    assert (metrics["AP"], metrics["AP50"], metrics["AP75"]) == (None, None, None)  # once 0.0
    assert metrics["note"].startswith("no ground-truth boxes to evaluate against: AP is undefined")


# -- training ---------------------------------------------------------------------------------------------------------
class _NanImages(CocoGroundingDataset):
    """Decodes the listed images to NaN (a corrupt decode the file checks cannot see)."""

    nan_ids: set[int] = set()

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        if sample.image_id in self.nan_ids:
            sample.image.fill_(float("nan"))
        return sample


def test_case_non_finite_loss(root, tokenizer, tmp_path):
    ds = _NanImages(_coco(), root, PROMPT)
    cfg = dataclasses.replace(TrainConfig.from_name("1_shot"), max_steps=2, batch_size=2, save_every=1,
                              output_dir=str(tmp_path / "run"), count_flops=False)
    second = batches(len(ds), cfg.batch_size, cfg.seed, 0)[1]  # the indices the loop loads at step 2
    ds.nan_ids = {ds.items[i][0]["id"] for i in second}
    ids = ", ".join(str(ds.items[i][0]["id"]) for i in second)
    torch.manual_seed(0)
    with pytest.raises(NonFiniteLossError, match=rf"^step 2: loss is nan for the batch of samples \[{ids}\]; "
                                                 rf"stopped before the update"):
        fit(GLIP(GLIPConfig.from_name("test", vocab_size=len(tokenizer))), tokenizer, ds, cfg)
    # the last good checkpoint is kept, finite, and nothing of step 2 was saved
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step*")) == ["step000000001"]
    last = safe_torch_load(tmp_path / "run" / "checkpoints" / "step000000001" / "state.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


class _CreatesAFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_case_resume_checkpoint_payload(root, tokenizer, tmp_path):
    """A checkpoint folder copied from elsewhere, complete by its record, whose state file runs code when
    unpickled: the resume refuses it (tensors and plain values only) and nothing runs."""
    from mmr_core.distributed.checkpoint import COMPLETE_RECORD

    ckpt = tmp_path / "run" / "checkpoints" / "step000000001"
    ckpt.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    torch.save({"model": {}, "step": 1, "payload": _CreatesAFile(str(marker))}, ckpt / "state.pt")
    (ckpt / COMPLETE_RECORD).write_text(json.dumps({"format": 1, "tag": ckpt.name, "step": 1, "world_size": 1,
                                                    "files": {"state.pt": (ckpt / "state.pt").stat().st_size}}))
    (ckpt.parent / "latest").write_text(ckpt.name)
    cfg = dataclasses.replace(TrainConfig.from_name("1_shot"), max_steps=2, output_dir=str(tmp_path / "run"),
                              count_flops=False)
    model = GLIP(GLIPConfig.from_name("test", vocab_size=len(tokenizer)))
    with pytest.raises(UntrustedCheckpointError, match=r"state\.pt: refusing to unpickle type io\.open"):
        fit(model, tokenizer, CocoGroundingDataset(_coco(), root, PROMPT), cfg)
    assert not marker.exists()


# -- property: any value in any field of an image / annotation record, or a category id --------------------------
_SCALARS = (st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=6))
_JSON_LIKE = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=5)
                          | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
_FIELDS = {"images": ["id", "file_name", "width", "height"],
           "annotations": ["id", "image_id", "category_id", "bbox", "iscrowd"], "categories": ["id"]}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_property_records_raise_only_record_errors(root, data):
    """The COCO parser either builds a dataset whose boxes are finite and inside their images, or raises a
    RecordError naming the record; nothing else (no KeyError, TypeError, NaN box)."""
    coco = _coco()
    for _ in range(data.draw(st.integers(1, 3))):
        section = data.draw(st.sampled_from(sorted(_FIELDS)))
        record = data.draw(st.sampled_from(coco[section]))
        field = data.draw(st.sampled_from(_FIELDS[section]))
        if data.draw(st.booleans()):
            record[field] = data.draw(_JSON_LIKE)
        else:
            record.pop(field, None)
    try:
        ds = CocoGroundingDataset(coco, root, PROMPT)
    except RecordError as err:
        assert str(err).startswith("<annotations>:")
        return
    for im, anns in ds.items:
        for box, label in anns:
            x0, y0, x1, y1 = box
            assert all(np.isfinite(box)) and 0 <= x0 < x1 <= im["width"] and 0 <= y0 < y1 <= im["height"]
            assert 0 <= label < 3


# -- the docs table ----------------------------------------------------------------------------------------------
def test_docs_table_matches_the_cases():
    text = DOCS.read_text()
    section = text.split("\n## MedVLM\n", 1)[1].split("\n## ", 1)[0]
    documented = [name for name in re.findall(r"^\| `?([a-z0-9_]+)`? \|", section, flags=re.MULTILINE)
                  if name != "case"]  # the header row
    tested = sorted(name.removeprefix("test_case_") for name in globals() if name.startswith("test_case_"))
    assert sorted(documented) == tested
