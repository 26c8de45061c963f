"""TrainLoRA's dataset folder: captions, kohya repeat folders, buckets, odd image modes, bad files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_loom.training.dataset import (
    DatasetError,
    buckets,
    epoch_batches,
    load_pixels,
    nearest_bucket,
    scan_dataset,
)


def picture(size=(64, 64), colour=(200, 30, 30)):
    return Image.new("RGB", size, colour)


def test_buckets_are_kohyas_multiples_of_64_within_the_area():
    sizes = buckets(512)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert nearest_bucket((1536, 1024), sizes)[0] > nearest_bucket((1536, 1024), sizes)[1]
    assert nearest_bucket((1000, 1000), sizes) == (512, 512)
    assert buckets(64) == [(64, 64)]


def test_captions_prefix_repeat_folders_and_tag_frequency(tmp_path):
    picture().save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red square, blue background")
    (tmp_path / "10_star").mkdir()
    picture().save(tmp_path / "10_star" / "b.jpg")
    (tmp_path / "10_star" / "b.txt").write_text("star")
    picture().save(tmp_path / "10_star" / "c.webp")  # no caption
    (tmp_path / "notes.md").write_text("not an image")

    dataset = scan_dataset(tmp_path, resolution=64, caption_prefix="sks")
    captions = {item.relative: (item.caption, item.repeats) for item in dataset.items}
    assert captions == {
        "a.png": ("sks, red square, blue background", 1),
        "10_star/b.jpg": ("sks, star", 10),
        "10_star/c.webp": ("sks", 10),
    }
    assert dataset.num_train_images == 21
    frequency = dataset.tag_frequency()
    assert frequency == {
        tmp_path.name: {"sks": 1, "red square": 1, "blue background": 1},
        "10_star": {"sks": 2, "star": 1},
    }
    assert all(isinstance(n, int) for tags in frequency.values() for n in tags.values())
    assert dataset.dataset_dirs()["10_star"] == {"n_repeats": 10, "img_count": 2}
    json.dumps(dataset.bucket_info())
    notes = "\n".join(dataset.notes)
    assert "notes.md" in notes and "ignored" in notes
    assert "10_star/c.webp" in notes and "no caption" in notes


def test_odd_image_modes_are_converted_and_reported(tmp_path):
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp_path / "rgba.png")  # fully transparent → white
    Image.new("L", (64, 64), 128).save(tmp_path / "grey.png")
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(tmp_path / "sixteen.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (64, 64), 3).save(tmp_path / "palette.png")
    dataset = scan_dataset(tmp_path, resolution=64)
    notes = "\n".join(dataset.notes)
    for name in ("rgba.png", "grey.png", "sixteen.png", "cmyk.jpg", "palette.png"):
        assert name in notes
    pixels = {item.relative: load_pixels(item) for item in dataset.items}
    for tensor in pixels.values():
        assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert torch.allclose(pixels["rgba.png"], torch.ones(3, 64, 64))  # transparent composited on white
    assert torch.allclose(pixels["sixteen.png"], torch.ones(3, 64, 64))  # 65535 of 16 bits is white
    assert abs(pixels["grey.png"].mean().item() - (128 / 127.5 - 1)) < 1e-6
    assert pixels["cmyk.jpg"][1].mean() < -0.9 < 0.9 < pixels["cmyk.jpg"][0].mean()  # CMYK (0, M, Y, 0) is red


def test_images_are_scaled_to_cover_their_bucket_and_centre_cropped(tmp_path):
    image = Image.new("RGB", (256, 128), (0, 0, 0))
    image.paste((255, 255, 255), (64, 0, 192, 128))  # a white middle half
    image.save(tmp_path / "wide.png")
    (item,) = scan_dataset(tmp_path, resolution=128).items
    assert item.bucket[0] > item.bucket[1]
    pixels = load_pixels(item)
    assert pixels.shape == (3, item.bucket[1], item.bucket[0])
    assert pixels[:, :, pixels.shape[2] // 2].min() > 0.9  # the centre stays in the crop


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: None, "no such folder"),
        (lambda d: d.mkdir(), "no images"),
        (lambda d: (d.mkdir(), (d / "x.txt").write_text("only a caption")), "no images"),
    ],
)
def test_missing_or_empty_folders_are_clear_errors(tmp_path, make, expected):
    folder = tmp_path / "data"
    make(folder)
    with pytest.raises(DatasetError, match=expected) as error:
        scan_dataset(folder, resolution=64)
    assert str(folder) in str(error.value)


def test_truncated_and_unreadable_images_name_the_file(tmp_path):
    picture((128, 128)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cut.png"):
        scan_dataset(tmp_path, resolution=64)
    (tmp_path / "cut.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="cut.png: not a readable image"):
        scan_dataset(tmp_path, resolution=64)


def test_an_image_far_below_the_resolution_is_refused_with_advice(tmp_path):
    picture((100, 90)).save(tmp_path / "small.png")
    with pytest.raises(DatasetError, match=r"small.png: 100×90 is far below resolution 512.*lower resolution to 64"):
        scan_dataset(tmp_path, resolution=512)
    assert scan_dataset(tmp_path, resolution=128).notes  # 2× upscale is allowed, and reported


def test_epoch_order_is_seeded_complete_and_one_bucket_per_batch(tmp_path):
    for i in range(5):
        picture((64, 64)).save(tmp_path / f"square{i}.png")
        picture((128, 64)).save(tmp_path / f"wide{i}.png")
    dataset = scan_dataset(tmp_path, resolution=64 * 2)
    first = epoch_batches(dataset, 2, seed=1, epoch=0)
    assert first == epoch_batches(dataset, 2, seed=1, epoch=0)
    assert first != epoch_batches(dataset, 2, seed=1, epoch=1)
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert all(len({dataset.items[i].bucket for i in batch}) == 1 for batch in first)
