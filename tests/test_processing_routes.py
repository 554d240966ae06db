"""One image through every input route (path, pathlib path, EncodedImage bytes, PIL image, array) and every image
processor (ImageProcessor, its open_clip transform, NaFlexImageProcessor): transparency composited onto white."""

import os
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_processing import CLIP, VIT, assert_same_pixels, reference, rng
from transformers.image_transforms import convert_to_rgb

from dualenc.errors import InputError
from dualenc.processing import EncodedImage, ImageProcessor, NaFlexImageProcessor
from dualenc.processing.open_clip import OpenClipTransform

PROCESSORS = {
    "vit": lambda: ImageProcessor(size=8),  # do_convert_rgb false: RGB because of its 3-value mean
    "clip": lambda: ImageProcessor(**CLIP, size=8, crop_size=8),
    "open_clip": lambda: ImageProcessor(open_clip=OpenClipTransform(size=8)),
    "open_clip-longest": lambda: ImageProcessor(open_clip=OpenClipTransform(size=8, resize_mode="longest",
                                                                            fill_color=30)),
    "naflex": lambda: NaFlexImageProcessor(patch_size=4, max_num_patches=6),
}
SAVED = ["RGBA", "LA", "P+index", "L+value", "RGB+colour"]  # modes with transparency a PNG file keeps


def transparent(mode, height=12, width=20):
    """Noise of `mode`, transparent in part: its top rows fully (black stored under them), the rest partly."""
    rgba = rng(1).integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[:4] = 0
    if mode in ("RGBA", "LA", "PA"):
        image = Image.fromarray(rgba, "RGBA")
        return image.convert("P").convert("PA") if mode == "PA" else image.convert(mode)
    base = mode.split("+")[0]
    image = Image.fromarray(rgba[..., :3]).convert(base, **({"colors": 16} if base == "P" else {}))
    image.info["transparency"] = image.getpixel((0, 0))  # the top rows' index, gray value or RGB colour
    return image


def on_white(image):
    """transformers' convert_to_rgb: the image composited onto white, as an opaque RGB PIL image."""
    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


def outputs(processor, images):
    out = processor(images)
    return dict(out) if isinstance(out, dict) else {"pixel_values": out}


@pytest.mark.parametrize("name", PROCESSORS)
def test_transparency_is_composited_onto_white_on_every_route(name, tmp_path):
    processor = PROCESSORS[name]()
    for mode in SAVED + ["PA"]:
        image = transparent(mode)
        assert image.mode == mode.split("+")[0] and (mode in ("RGBA", "LA", "PA") or "transparency" in image.info)
        white = on_white(image)
        assert np.asarray(white)[:4].min() == 255 and np.asarray(image.convert("RGB"))[:4].max() == 0
        expected = outputs(processor, white)
        routes = {"PIL": image}
        if mode in SAVED:
            path = tmp_path / f"{mode}.png"
            image.save(path)
            with Image.open(path) as opened:  # the file keeps the mode and its transparency
                assert opened.mode == image.mode and np.array_equal(np.asarray(on_white(opened)), np.asarray(white))
            routes.update(path=str(path), pathlib=path, bytes=EncodedImage("sample", path.read_bytes()))
        if mode == "RGBA":
            routes["array"] = np.asarray(image)  # (H, W, 4) uint8: read as RGBA
        for route, item in routes.items():
            got = outputs(processor, [item, white])
            for key in expected:
                np.testing.assert_array_equal(got[key][:1], expected[key], err_msg=f"{name} {mode} {route}: {key}")


@pytest.mark.parametrize("mode", ["LA", "L+value"])
def test_grayscale_settings_composite_gray_onto_white(mode):
    processor = ImageProcessor(size=8, image_mean=[0.5], image_std=[0.5])  # images keep their channels
    image = transparent(mode)
    got = processor(image)
    assert got.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(got, processor(on_white(image).convert("L")))
    four = np.asarray(transparent("RGBA"))  # an (H, W, 4) array is RGBA: composited whatever the settings
    np.testing.assert_array_equal(ImageProcessor(size=8, image_mean=0.5, image_std=0.5)(four),
                                  ImageProcessor(size=8, image_mean=0.5, image_std=0.5)(on_white(Image.fromarray(four))))


def test_two_channel_arrays_are_refused():
    for processor in (ImageProcessor(size=8), ImageProcessor(open_clip=OpenClipTransform(size=8)),
                      NaFlexImageProcessor(patch_size=4, max_num_patches=6)):
        with pytest.raises(InputError, match="image 0"):
            processor(np.zeros((6, 6, 2), np.uint8))


def test_paths_match_transformers(tmp_path):
    a = rng().integers(0, 256, (40, 60, 4), dtype=np.uint8)
    paths = [str(tmp_path / n) for n in ("rgba.png", "rotated.jpg", "palette.png", "gray.png", "wide.png")]
    Image.fromarray(a, "RGBA").save(paths[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    Image.fromarray(a[..., :3]).save(paths[1], exif=exif)
    Image.fromarray(a[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(paths[2], transparency=2)
    Image.fromarray(a[..., 0]).save(paths[3])
    Image.fromarray(a[:3, :, 1]).save(paths[4])
    for settings_ in (VIT, CLIP):
        ours = ImageProcessor(**settings_, size=32, crop_size=24)
        ref = reference(ours, tmp_path / settings_["image_processor_type"])
        for path in (paths[1], paths[3], paths[4]):
            assert_same_pixels(ours, ref, path)  # transformers' own path route (load_image)
        for path in (paths[0], paths[2]):  # transparent files: transformers' pixels of the composited image
            with Image.open(path) as opened:
                assert_same_pixels(ours, ref, path, on_white(ImageOps.exif_transpose(opened)))
        np.testing.assert_array_equal(ours([pathlib.Path(paths[1]), Image.open(paths[1])])[0],
                                      ours(paths[1])[0])


def test_paths_are_closed(tmp_path):
    Image.fromarray(rng().integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        ImageProcessor()([str(tmp_path / "x.png")] * 20)
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds
