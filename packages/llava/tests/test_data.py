"""LLaVA JSON records, truncation, padding sides, grouping sampler, WebDataset shards."""

import json

import pytest
import torch

from mmr_llava import conversation as conv
from mmr_llava import data
from mmr_llava.tiny_tokenizer import train_tiny_tokenizer

TEXTS = ["what is in the image?", "a red cube and a blue ball.", "how many objects?", "there are 2 objects."]


@pytest.fixture(scope="module")
def tok():
    t = train_tiny_tokenizer(TEXTS * 5 + [conv.render("v1", [("user", "x"), ("assistant", "y")])[0]], 200)
    return t


def _img(seed):
    return torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(seed))


RECORDS = [
    {"id": "one", "image": _img(0), "conversations": [
        {"from": "human", "value": "what is in the image?"}, {"from": "gpt", "value": "a red cube and a blue ball."}]},
    {"id": "two", "images": [_img(1), _img(2)], "conversations": [
        {"from": "human", "value": "<image> and <image>: how many objects?"},
        {"from": "gpt", "value": "there are 2 objects."}]},
    {"id": "text", "conversations": [
        {"from": "human", "value": "how many objects?"}, {"from": "gpt", "value": "there are 2 objects."}]},
]


def _ds(tok, **kw):
    image_id = conv.prepare_tokenizer(tok, "v1")
    return data.LlavaDataset(RECORDS, tok, "v1", image_id, num_patches=4, image_size=16, **kw), image_id


def test_records_images_and_labels(tok):
    ds, image_id = _ds(tok)
    one, two, text = ds[0], ds[1], ds[2]
    assert one["pixel_values"].shape == (1, 3, 16, 16) and (one["input_ids"] == image_id).sum() == 4
    assert two["pixel_values"].shape == (2, 3, 16, 16) and (two["input_ids"] == image_id).sum() == 8
    assert text["pixel_values"] is None and (text["input_ids"] == image_id).sum() == 0
    sup = text["input_ids"][text["labels"] != -100].tolist()
    assert tok.decode(sup).replace(" ", "") == "thereare2objects.</s>"
    # the missing placeholder of a single-image record goes in front of the first question
    assert tok.decode(one["input_ids"].tolist()).count("what is in the image?") == 1
    assert ds.modality_lengths[2] < 0 < ds.modality_lengths[0]


def test_placeholder_mismatch_is_named(tok):
    bad = dict(RECORDS[1], id="bad", images=[_img(1)])
    ds, _ = _ds(tok)
    ds.records = [bad]
    with pytest.raises(data.DataError, match=r"^<memory>:id bad: conversations: has 2 '<image>' placeholder"):
        ds[0]


def test_truncation_keeps_images_whole_and_labels_aligned():
    img = 9
    ids = [1, 5, img, img, img, img, 6, 7, img, img, img, img, 8, 2]
    labels = [-100] * 12 + [8, 2]
    out_ids, out_labels, kept = data.truncate(ids, labels, 10, img, 4)
    assert out_ids == ids[:8] and out_labels == labels[:8] and kept == 1
    out_ids, _, kept = data.truncate(ids, labels, 12, img, 4)
    assert kept == 2 and len(out_ids) == 12
    with pytest.raises(data.DataError, match="cuts through an image"):
        data.truncate(ids, labels, 10, img, 4, record_id="r", mode="error")


def test_truncated_dataset_drops_cut_images(tok):
    full, image_id = _ds(tok)
    positions = (full[1]["input_ids"] == image_id).nonzero().flatten().tolist()
    cut = positions[4] + 2  # inside the second image block
    ds, _ = _ds(tok, max_length=cut)
    item = ds[1]
    assert len(item["input_ids"]) == positions[4] == len(item["labels"])
    assert item["pixel_values"].shape[0] == 1 and int((item["input_ids"] == image_id).sum()) == 4
    torch.testing.assert_close(item["pixel_values"][0], full[1]["pixel_values"][0])


def test_encode_record_reports_what_truncation_removed(tok):
    full, image_id = _ds(tok)
    assert [(full[i]["images_cut"], full[i]["supervision_cut"]) for i in range(3)] == [(0, False)] * 3
    positions = (full[1]["input_ids"] == image_id).nonzero().flatten().tolist()
    item = _ds(tok, max_length=positions[4] + 2)[0][1]  # cut inside the second image, before the answer
    assert (item["id"], item["images_cut"], item["supervision_cut"]) == ("two", 1, True)
    text = full[2]
    first_answer_token = int((text["labels"] != -100).nonzero()[0])
    item = _ds(tok, max_length=first_answer_token + 1)[0][2]  # one answer token survives
    assert (item["images_cut"], item["supervision_cut"]) == (0, False)
    item = _ds(tok, max_length=first_answer_token)[0][2]
    assert (item["images_cut"], item["supervision_cut"]) == (0, True)


def test_single_image_turns_are_rewritten_as_the_original_does():
    record = {"id": "r", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hi."},
        {"from": "human", "value": "  What is this?\n<image> "}, {"from": "gpt", "value": "A cube."}]}
    convs = data.normalize_conversations(record)
    assert [c["value"] for c in convs] == ["Hello.", "Hi.", "<image>\nWhat is this?", "A cube."]
    alone = dict(record, conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A."}])
    assert data.normalize_conversations(alone)[0]["value"] == "<image>"
    # Several images in one turn (beyond the original) stay where the data puts them.
    two = dict(id="two", images=["a", "b"],
               conversations=[{"from": "human", "value": "Is <image> like <image>?"}, {"from": "gpt", "value": "No."}])
    assert data.normalize_conversations(two)[0]["value"] == "Is <image> like <image>?"


def test_collator_padding_sides(tok):
    ds, _ = _ds(tok)
    items = [ds[0], ds[2]]
    right = data.Collator(tok.pad_token_id, "right")(items)
    left = data.Collator(tok.pad_token_id, "left")(items)
    n = len(items[1]["input_ids"])
    assert right["attention_mask"][1, :n].all() and not right["attention_mask"][1, n:].any()
    assert left["attention_mask"][1, -n:].all() and not left["attention_mask"][1, :-n].any()
    assert (right["labels"][right["attention_mask"] == 0] == -100).all()
    assert right["pixel_values"].shape[0] == 1
    assert torch.equal(left["input_ids"][1, -n:], items[1]["input_ids"])


def test_grouped_sampler_separates_modalities():
    lengths = [10, -5, 12, -7, 30, -2, 8, -9]
    s = data.ModalityLengthGroupedSampler(lengths, batch_size=2)
    order = list(s)
    assert sorted(order) == list(range(8))
    for k in range(0, 8, 2):
        assert (lengths[order[k]] > 0) == (lengths[order[k + 1]] > 0)


def test_webdataset_shards(tok, tmp_path):
    from mmr_core.data import write_shards

    image_id = conv.prepare_tokenizer(tok, "v1")
    samples = []
    for i, r in enumerate(RECORDS[:1] + RECORDS[2:]):
        rec = {k: v for k, v in r.items() if k not in ("image", "images")}
        s = {"key": f"s{i}", "json": rec}
        if "image" in r:
            s["image"] = (r["image"] * 255).byte().permute(1, 2, 0).numpy()
        samples.append(s)
    write_shards(samples, tmp_path, prefix="llava", show_progress=False)
    pipe = data.webdataset_pipeline(str(tmp_path / "llava-000000.tar"), tok, "v1", image_id, 4, 16,
                                    batch_size=2, shuffle=False)
    batch = next(iter(pipe))
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape == (1, 3, 16, 16)
    assert json.dumps(RECORDS[2]["conversations"])  # records stay JSON-serialisable


def test_packing_matches_padding(tok):
    from mmr_llava.model import LlavaConfig, LlavaModel

    ds, image_id = _ds(tok)
    cfg = LlavaConfig.from_name("tiny", image_token_index=image_id)
    cfg.vision = dict(cfg.vision, image_size=16)  # 4 patches, as the dataset expands
    torch.manual_seed(0)
    model = LlavaModel(cfg).eval()
    items = [ds[0], ds[1], ds[2]]
    for it in items:  # the packed row drops each sample's first target; do the same in the padded batch
        it["labels"][0] = -100
    padded = data.Collator(tok.pad_token_id, "right")(items)
    packed = data.PackingCollator()(items)
    assert packed["input_ids"].shape == (1, sum(len(it["input_ids"]) for it in items))
    with torch.no_grad():
        a = model(padded["input_ids"], padded["pixel_values"], padded["attention_mask"], padded["labels"])
        b = model(packed["input_ids"], packed["pixel_values"], None, packed["labels"],
                  position_ids=packed["position_ids"])
    # Packed and padded rows run the same float32 math with other matrix shapes (one long row vs a padded
    # batch), so BLAS blocks the sums differently: per logit ~sqrt(64) * 2**-24 * |terms| rounding per dot
    # product through 2 layers, ~1e-6 on logits of size ~1-5; the mean loss over ~50 targets averages it.
    # 1e-5 on the loss and 1e-4 on single logits are >10x those bounds on any x86 kernel.
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
    n0 = len(items[0]["input_ids"])
    torch.testing.assert_close(a["logits"][0, :n0], b["logits"][0, :n0], rtol=1e-4, atol=1e-4)
    n1 = len(items[1]["input_ids"])
    torch.testing.assert_close(a["logits"][1, :n1], b["logits"][0, n0:n0 + n1], rtol=1e-4, atol=1e-4)


def test_row_packing_matches_padding(tok):
    from mmr_llava.model import LlavaConfig, LlavaModel

    ds, image_id = _ds(tok)
    cfg = LlavaConfig.from_name("tiny", image_token_index=image_id)
    cfg.vision = dict(cfg.vision, image_size=16)
    torch.manual_seed(0)
    model = LlavaModel(cfg).eval()
    items = [ds[1], ds[0], ds[2]]
    for it in items:
        it["labels"][0] = -100
    longest = max(len(it["input_ids"]) for it in items)
    packed = data.PackingCollator(row_tokens=longest + 5, pad_token_id=tok.pad_token_id)(items)
    assert packed["input_ids"].shape[1] <= longest + 5 and packed["input_ids"].shape[0] >= 2
    padded = data.Collator(tok.pad_token_id, "right")(items)
    with torch.no_grad():
        a = model(padded["input_ids"], padded["pixel_values"], padded["attention_mask"], padded["labels"])
        b = model(packed["input_ids"], packed["pixel_values"], None, packed["labels"],
                  position_ids=packed["position_ids"])
    # As in the test above: the same math in other shapes, rounding well below 1e-5 on the mean loss.
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        data.PackingCollator(row_tokens=5)(items)


def _reference_pixels(image, size: int, pad: bool) -> torch.Tensor:
    """The original pipeline: expand2square (mean colour in 8 bits) then transformers' PIL CLIP processor."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if pad and image.width != image.height:
        side = max(image.size)
        square = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in data.CLIP_MEAN))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_mean=list(data.CLIP_MEAN), image_std=list(data.CLIP_STD))
    return processor(image, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("hw", [(37, 61), (61, 37), (50, 50), (17, 29), (336, 500)])
@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_preprocess_image_matches_the_original_pipeline(hw, aspect):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    image = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    ours = data.preprocess_image(image, 32, aspect)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
    # The same PIL resize on both sides (identical uint8 pixels); only the float32 rescale/normalise
    # ((x / 255 - mean) / std, outputs within +-2.2) may round in another order: <= 2 ulp of 2.2 = 5e-7.
    torch.testing.assert_close(ours, _reference_pixels(image, 32, aspect == "pad"), rtol=0, atol=1e-6)
    # Arrays, uint8 tensors and [0, 1] float tensors of the same pixels give the same input.
    arr = np.array(image)
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    for other in (arr, chw, chw.float() / 255):
        torch.testing.assert_close(data.preprocess_image(other, 32, aspect), ours, rtol=0, atol=0)


def test_preprocess_image_aspect_modes_differ_and_bad_mode_is_named():
    from PIL import Image

    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    padded, cropped = data.preprocess_image(wide, 32, "pad"), data.preprocess_image(wide, 32, "square")
    red = (1 - data.CLIP_MEAN[0]) / data.CLIP_STD[0]
    assert torch.allclose(cropped[0], torch.full((32, 32), red), atol=1e-5)  # the crop sees only red
    assert padded[0, 0, 0] < 0.1 and abs(padded[0, 16, 16] - red) < 1e-5  # mean-grey band above, red middle
    with pytest.raises(ValueError, match="anyres"):
        data.preprocess_image(wide, 32, "anyres")
