"""Training augmentation (dualenc.processing.augment) against open_clip's train transform, its determinism in the
pipeline, and the crop's distribution."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

import dualenc
from dualenc import data
from dualenc.data.pipeline import Pipeline
from dualenc.errors import ConfigError
from dualenc.processing import augment as aug
from dualenc.processing.open_clip import OpenClipTransform
from dualenc.processing.pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SIZE = 16
JITTER = aug.Augment(scale=(0.5, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8,
                     gray_scale_prob=0.3)


@pytest.fixture(scope="module")
def photo():
    china, _ = load_sample_images().images
    return Image.fromarray(china[100:220, 150:310])  # a 120x160 crop of a real photo


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    data.write_vocab(folder, ["a photo of a building", "a flower"])
    return dualenc.Processor(dualenc.ImageProcessor(size={"height": SIZE, "width": SIZE}),
                             dualenc.Tokenizer.from_pretrained(folder, max_length=8))


def open_clip_pixels(image, draw, augment, mean, std, monkeypatch):
    """open_clip's train transform of `image`, torchvision's random parameters replaced by the draw's."""
    import open_clip
    from open_clip import transform as oc_transform
    from torchvision import transforms

    transform = open_clip.image_transform(SIZE, is_train=True, mean=mean, std=std, aug_cfg=open_clip.AugmentationCfg(
        scale=augment.scale, color_jitter=augment.color_jitter, color_jitter_prob=augment.color_jitter_prob,
        gray_scale_prob=augment.gray_scale_prob))
    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(lambda img, scale, ratio: draw.box))
    if draw.jitter is not None:
        order, factors = draw.jitter
        monkeypatch.setattr(transforms.ColorJitter, "get_params",
                            staticmethod(lambda *ranges: (torch.tensor(order), *factors)))
    # open_clip's coins: random.random() < p applies the jitter, then the grayscale.
    coins = iter([0.0 if draw.jitter is not None else 0.999999, 0.0 if draw.gray else 0.999999])
    monkeypatch.setattr(oc_transform.random, "random", lambda: next(coins))
    out = transform(image).numpy()
    monkeypatch.undo()
    return out


@pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")  # open_clip warns of the items it uses
def test_pixels_are_open_clips_train_transform_given_its_draws(photo, monkeypatch):
    """The same crop box and jitter factors as torchvision draws give open_clip's pixels exactly: the same pillow
    calls, then float32 to_tensor and Normalize for open_clip's processor; transformers' CLIP processor rescales
    in float64 instead, which rounds every 8-bit value to the same float32."""
    open_clip_processor = dualenc.ImageProcessor(open_clip=OpenClipTransform(size=SIZE))
    clip_processor = dualenc.ImageProcessor(image_processor_type="CLIPImageProcessor",
                                            size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    kinds = set()
    for step in range(16):
        draw = aug.draw(JITTER, aug.generator(7, step, 0), photo.height, photo.width)
        kinds.add((draw.jitter is not None, draw.gray))
        reference = open_clip_pixels(photo, draw, JITTER, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, monkeypatch)
        ours = aug.augment_pixels(JITTER, open_clip_processor, photo, aug.generator(7, step, 0))
        assert ours.dtype == np.float32 and ours.shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(ours, reference)
        np.testing.assert_array_equal(aug.augment_pixels(JITTER, clip_processor, photo, aug.generator(7, step, 0)),
                                      reference)
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}  # every branch was compared


@pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")
def test_vit_processor_normalises_as_it_does(photo, monkeypatch):
    """A ViT processor (mean/std 0.5, {"height", "width"}) with open_clip's default augmentation."""
    augment = aug.Augment()
    processor = dualenc.ImageProcessor(size={"height": SIZE, "width": SIZE})
    draw = aug.draw(augment, aug.generator(0, 3, 5), photo.height, photo.width)
    reference = open_clip_pixels(photo, draw, augment, (0.5,) * 3, (0.5,) * 3, monkeypatch)
    np.testing.assert_array_equal(aug.augment_pixels(augment, processor, photo, aug.generator(0, 3, 5)), reference)


def test_crop_area_and_ratio_stay_in_their_ranges():
    rng, height, width = np.random.default_rng(0), 400, 480
    boxes = np.array([aug.crop_box(rng, height, width, (0.9, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)])
    top, left, h, w = boxes.T
    share = h * w / (height * width)
    slack = (height + width) / (height * width)  # rounding each side of the box to a pixel
    assert share.min() >= 0.9 - slack and share.max() <= 1.0 + slack
    assert abs(share.mean() - 0.95) < 0.01  # uniform over the range
    assert ((w / h >= 3 / 4 - 0.01) & (w / h <= 4 / 3 + 0.01)).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    wide = np.array([aug.crop_box(rng, 100, 100, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(500)])
    assert 0.08 - 0.03 <= (wide[:, 2] * wide[:, 3] / 1e4).min() < 0.2 < (wide[:, 2] * wide[:, 3] / 1e4).max()


def test_a_photo_wider_than_the_ratios_allow_falls_back_to_torchvisions_center_crop():
    """A 427x640 photo (3:2) has no crop of 90% of its area within 3:4..4:3: torchvision's RandomResizedCrop then
    takes the centered 4:3 crop every time (89% of the area), and so does crop_box."""
    from torchvision import transforms

    expected = transforms.RandomResizedCrop.get_params(torch.zeros(3, 427, 640), [0.9, 1.0], [3 / 4, 4 / 3])
    rng = np.random.default_rng(1)
    assert {aug.crop_box(rng, 427, 640, (0.9, 1.0), (3 / 4, 4 / 3)) for _ in range(50)} == {tuple(expected)}


def test_draws_are_a_function_of_seed_step_and_row_alone():
    first = [aug.draw(JITTER, aug.generator(1, step, row), 120, 160) for step in range(3) for row in range(4)]
    random.seed(99), np.random.seed(99)  # global state plays no part
    again = [aug.draw(JITTER, aug.generator(1, step, row), 120, 160) for step in range(3) for row in range(4)]
    assert first == again and len(set(first)) == len(first)
    assert aug.draw(JITTER, aug.generator(2, 0, 0), 120, 160) != first[0]


def test_pipeline_rows_are_the_same_across_instances_and_after_a_restart(photo, processor):
    crops = [np.asarray(photo)[i * 10:i * 10 + 60, i * 20:i * 20 + 80] for i in range(4)]
    dataset = data.PairDataset(crops, ["a photo of a building"] * 4, np.arange(4))

    def batches(start=0, steps=4, augment=JITTER):
        pipe = Pipeline(dataset, processor, 4, seed=5, max_length=8, start=start, steps=steps, process_index=0,
                        process_count=1, augment=augment)
        return [batch for _, batch in pipe]

    whole, again, resumed = batches(), batches(), batches(start=2)
    for a, b in zip(whole, again):
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    for a, b in zip(whole[2:], resumed):
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    # Every step holds all four records (one epoch per step): each record's pixels differ from step to step.
    by_record = [{int(r): px for r, px in zip(b["_record"], b["pixel_values"])} for b in whole]
    assert all(not np.array_equal(by_record[0][r], by_record[1][r]) for r in range(4))
    # The row's pixels are augment_pixels with the row's generator.
    row = aug.augment_pixels(JITTER, processor, crops[int(whole[3]["_record"][2])], aug.generator(5, 3, 2))
    np.testing.assert_array_equal(whole[3]["pixel_values"][2], row)
    plain = batches(steps=1, augment=None)[0]["pixel_values"]
    assert plain.shape == whole[0]["pixel_values"].shape and not np.array_equal(plain, whole[0]["pixel_values"])


def test_settings_are_checked_with_clear_errors(processor):
    for kwargs, field in ((dict(scale=(0.0, 1.0)), "scale"), (dict(scale=(0.9, 1.2)), "scale"),
                          (dict(ratio=(2.0, 1.0)), "ratio"), (dict(gray_scale_prob=1.5), "gray_scale_prob"),
                          (dict(color_jitter=(0.4, 0.4, 0.4, 0.1)), "color_jitter_prob"),
                          (dict(color_jitter_prob=0.8), "color_jitter"),
                          (dict(color_jitter=(0.4, 0.4, 0.4, 0.7), color_jitter_prob=0.8), "color_jitter"),
                          (dict(color_jitter=(0.4, 0.4), color_jitter_prob=0.8), "color_jitter")):
        with pytest.raises(ConfigError, match=f"'{field}'"):
            aug.Augment(**kwargs)
    assert aug.Augment.from_dict(JITTER.to_dict()) == JITTER
    with pytest.raises(ConfigError, match="unknown fields"):
        aug.Augment.from_dict({"hflip": 0.5})
    naflex = dualenc.processing.NaFlexImageProcessor()
    with pytest.raises(ConfigError, match="NaFlex"):
        aug.output_size(naflex)
    with pytest.raises(ConfigError, match="varying size"):
        aug.output_size(dualenc.ImageProcessor(image_processor_type="SiglipImageProcessor", size=SIZE))
    dataset = data.load_digits("test", image_size=8)
    with pytest.raises(ConfigError, match="LiT cache.*unaugmented"):
        Pipeline(dataset, processor, 4, process_index=0, process_count=1, features=object(), augment=JITTER)
    assert math.isclose(aug.Augment().scale[0], 0.9)  # open_clip's AugmentationCfg default
