"""Image modes and channels, 16-bit scaling, pillow's bomb warning and float32-safe settings of the image processors."""

import json
import warnings

import numpy as np
import pytest
import transformers
from conftest import max_diff
from PIL import Image
from transformers.image_transforms import convert_to_rgb

from dualenc.errors import ConfigError, InputError
from dualenc.processing import ImageProcessor, NaFlexImageProcessor
from dualenc.processing.open_clip import OpenClipTransform

CONVERTED = ["L", "LA", "1", "I", "F", "P", "P+transparency", "PA", "CMYK", "RGBA"]
KEPT = ["RGB", "YCbCr"]
PLAIN = dict(do_resize=False, do_rescale=False, do_normalize=False)  # pixel values as they come in, 0..255


def rng(seed=0):
    return np.random.default_rng(seed)


def make_image(mode, width=29, height=23, seed=0):
    """Noise of `mode` with a varying alpha, so compositing onto white shows."""
    rgba = rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode.startswith("P"):
        image = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        if mode == "P+transparency":
            image.info["transparency"] = 3
        return image.convert("PA") if mode == "PA" else image
    return Image.fromarray(rgba, "RGBA").convert(mode)


def gradient16(height=64, width=64):
    """Every 16-bit level from 0 to 65535, evenly spaced: 4096 pixels."""
    return np.linspace(0, 65535, height * width).round().astype(np.uint16).reshape(height, width)


def explicit_rgb(image):
    """transformers' convert_to_rgb of what the processors convert by themselves; 3-channel images as they are."""
    if isinstance(image, Image.Image):
        return image if image.mode in KEPT else convert_to_rgb(image, return_numpy=True)
    return convert_to_rgb(image[..., None] if image.ndim == 2 else image, return_numpy=True)


def vit_reference(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    return transformers.ViTImageProcessorPil.from_pretrained(tmp_path)


def naflex_reference(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    return transformers.Siglip2ImageProcessorPil.from_pretrained(tmp_path)


# -------------------------------------------------------------------------------- channels: RGB when needed


@pytest.mark.parametrize("mode", CONVERTED + KEPT)
def test_vit_default_gives_rgb_as_transformers_gives_converted_images(mode, tmp_path):
    ours = ImageProcessor(size=24)
    assert ours.do_convert_rgb is False and len(ours.image_mean) == 3
    ref = vit_reference(ours, tmp_path)
    image = make_image(mode)
    # transformers refuses the CONVERTED modes here: its pixels of the explicitly converted image are the reference.
    expected = ref(explicit_rgb(image), return_tensors="np")["pixel_values"]
    got = ours(image)
    assert got.shape == expected.shape == (1, 3, 24, 24)
    assert max_diff(got, expected) <= 1e-5
    if mode in CONVERTED:
        np.testing.assert_array_equal(got, ImageProcessor(size=24, do_convert_rgb=True)(image))


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((4, 5, 4), np.uint8)  # black, fully transparent
    rgba[0, 0] = (10, 20, 30, 255)  # one opaque pixel
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    for image, opaque in ((rgba, [10, 20, 30]), (Image.fromarray(rgba, "RGBA"), [10, 20, 30]),
                          (la, [la.getpixel((0, 0))[0]] * 3)):
        got = ImageProcessor(**PLAIN)(image)[0]
        assert got.shape == (3, 4, 5)
        assert got[:, 0, 0].tolist() == opaque
        got[:, 0, 0] = 255
        assert (got == 255).all()


def test_vit_default_converts_one_and_four_channel_arrays(tmp_path):
    ours = ImageProcessor(size=24)
    ref = vit_reference(ours, tmp_path)
    r = rng(1)
    arrays = [r.integers(0, 256, (17, 23), dtype=np.uint8), r.integers(0, 256, (17, 23, 1), dtype=np.uint8),
              r.integers(0, 256, (17, 23, 4), dtype=np.uint8), r.random((9, 30, 4)), r.random((9, 30, 1))]
    for array in arrays:
        rgb = explicit_rgb(array)
        assert rgb.shape[-1] == 3
        assert max_diff(ours(array), ref(rgb, return_tensors="np")["pixel_values"]) <= 1e-5
    stacked = ours(np.stack([arrays[2], arrays[2]]))
    assert stacked.shape == (2, 3, 24, 24)


def test_naflex_default_gives_rgb_as_transformers_gives_converted_images(tmp_path):
    ours = NaFlexImageProcessor(patch_size=8, max_num_patches=16)
    assert ours.do_convert_rgb is False
    ref = naflex_reference(ours, tmp_path)
    images = [make_image(mode, seed=i) for i, mode in enumerate(CONVERTED + KEPT)]
    images += [rng(2).integers(0, 256, (30, 20), dtype=np.uint8), rng(3).integers(0, 256, (20, 30, 4), dtype=np.uint8)]
    got = ours(images)
    assert got["pixel_values"].shape == (len(images), 16, 8 * 8 * 3)
    expected = ref([explicit_rgb(image) for image in images], return_tensors="np")
    for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
        assert max_diff(got[key], expected[key]) <= 1e-5, key


@pytest.mark.parametrize("stats", [dict(image_mean=[0.5], image_std=[0.25]), dict(image_mean=0.5, image_std=0.25)],
                         ids=["one-value", "number"])
def test_single_value_stats_keep_grayscale(stats, tmp_path):
    ours = ImageProcessor(size=24, **stats)
    ref = vit_reference(ours, tmp_path)
    for mode in ("L", "1", "I"):
        image = make_image(mode)
        got = ours(image)
        assert got.shape == (1, 1, 24, 24)
        assert max_diff(got, ref(image, return_tensors="np")["pixel_values"]) <= 1e-5
    if isinstance(stats["image_mean"], list):
        with pytest.raises(InputError, match="one value: pass grayscale"):
            ours(make_image("RGB"))
    else:  # a number fits any channels, as in transformers
        assert ours(make_image("RGB")).shape == (1, 3, 24, 24)


def test_explicit_do_convert_rgb_converts_three_channel_modes_too():
    image = make_image("YCbCr")
    kept, converted = ImageProcessor(**PLAIN)(image), ImageProcessor(**PLAIN, do_convert_rgb=True)(image)
    np.testing.assert_array_equal(kept[0], np.moveaxis(np.asarray(image), -1, 0))
    np.testing.assert_array_equal(converted[0], np.moveaxis(np.asarray(image.convert("RGB")), -1, 0))


# ------------------------------------------------------------------------------------------ 16-bit images


def expected_8bit(values):
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def sixteen_bit_images(values):
    raw = values.astype(np.uint16)
    size = raw.shape[::-1]
    return {"I;16": Image.fromarray(raw), "I;16B": Image.fromarray(raw.astype(">u2")),
            "I;16L": Image.frombytes("I;16L", size, raw.astype("<u2").tobytes()),
            "I;16N": Image.frombytes("I;16N", size, raw.tobytes()), "I": Image.fromarray(raw.astype(np.int32))}


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N", "I"])
def test_sixteen_bit_images_are_scaled_not_clipped(mode):
    values = gradient16()
    image = sixteen_bit_images(values)[mode]
    assert image.mode == mode and (np.asarray(image).min(), np.asarray(image).max()) == (0, 65535)
    expected = expected_8bit(values)
    assert (np.asarray(image.convert("L")) == 255).mean() > 0.99  # what pillow's convert gives: clipped
    for processor, channels in ((ImageProcessor(**PLAIN), 3), (ImageProcessor(**PLAIN, image_mean=[0.5],
                                                                              image_std=[0.5]), 1)):
        got = processor(image)[0]
        assert got.shape == (channels, 64, 64)
        assert len(np.unique(got)) == 256
        np.testing.assert_array_equal(got, np.broadcast_to(expected, got.shape))
    naflex = NaFlexImageProcessor(patch_size=8, max_num_patches=64, do_resize=False, do_rescale=False,
                                  do_normalize=False)(image)["pixel_values"][0]
    np.testing.assert_array_equal(naflex, np.repeat(expected.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3)
                                                    .reshape(64, 64), 3, axis=-1))


def test_sixteen_bit_png_paths_and_open_clip(tmp_path):
    values = gradient16()
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
        opened.load()
    scaled = Image.fromarray(expected_8bit(values), "L")
    got = ImageProcessor(**PLAIN)(str(path))[0]
    assert len(np.unique(got)) == 256
    np.testing.assert_array_equal(got, ImageProcessor(**PLAIN)(scaled.convert("RGB"))[0])
    open_clip = ImageProcessor(open_clip=OpenClipTransform(size=32))
    for image in (str(path), opened):
        np.testing.assert_array_equal(open_clip(image), open_clip(scaled))
    assert len(np.unique(open_clip(str(path)))) > 200


def test_thirty_two_bit_images_by_their_range():
    r = rng(4)
    small = r.integers(0, 256, (10, 12)).astype(np.int32)  # 8-bit values: as pillow converts them, as before
    wide = r.integers(-1000, 100000, (10, 12)).astype(np.int32)
    unit = r.random((10, 12)).astype(np.float32)
    float_8bit = (r.random((10, 12)) * 255).astype(np.float32)
    plain = ImageProcessor(**PLAIN, image_mean=[0.5], image_std=[0.5])
    np.testing.assert_array_equal(plain(Image.fromarray(small))[0, 0], small)
    np.testing.assert_array_equal(plain(Image.fromarray(float_8bit, "F"))[0, 0],
                                  np.asarray(Image.fromarray(float_8bit, "F").convert("L")))
    np.testing.assert_array_equal(plain(Image.fromarray(unit, "F"))[0, 0], np.round(unit.astype(np.float64) * 255))
    got = plain(Image.fromarray(wide))[0, 0]
    assert got.min() == 0 and got.max() == 255
    order = np.argsort(wide, axis=None, kind="stable")
    assert (np.diff(got.ravel()[order]) >= 0).all()  # the order of the values is kept
    nan = unit.copy()
    nan[3, 4] = np.nan
    with pytest.raises(InputError, match="image 0 .*NaN"):
        plain(Image.fromarray(nan, "F"))


def test_sixteen_bit_transparent_value_is_composited(tmp_path):
    values = gradient16(8, 8)
    path = tmp_path / "key.png"
    Image.fromarray(values).save(path, transparency=int(values[2, 3]))
    with Image.open(path) as opened:
        got = ImageProcessor(**PLAIN)(opened)[0]
    expected = np.broadcast_to(expected_8bit(values), got.shape).copy()
    expected[:, 2, 3] = 255
    np.testing.assert_array_equal(got, expected)


# -------------------------------------------------------------------------------- pillow's bomb warning


def test_large_file_warns_once_with_dualenc_warning(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(rng().integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)  # 600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # over the limit, under twice it
    for processor in (ImageProcessor(size=8), ImageProcessor(open_clip=OpenClipTransform(size=8)),
                      NaFlexImageProcessor(patch_size=4, max_num_patches=4)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", ResourceWarning)  # files left open by other tests, collected here
            processor(str(path))
        assert [w.category for w in caught] == [UserWarning], [str(w.message) for w in caught]
        message = str(caught[0].message)
        assert "big.png" in message and "600" in message and "400" in message


def test_truncated_large_file_gives_only_the_clean_error(tmp_path, monkeypatch):
    path = tmp_path / "cut.png"
    Image.fromarray(rng().integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    for processor in (ImageProcessor(size=8), ImageProcessor(open_clip=OpenClipTransform(size=8))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", ResourceWarning)  # files left open by other tests, collected here
            with pytest.raises(InputError, match=r"image 0 \(.*cut\.png\) cannot be read"):
                processor(str(path))
        assert caught == [], [str(w.message) for w in caught]


def test_encoded_images_read_as_their_files(tmp_path):
    from dualenc.processing import EncodedImage

    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the EXIF transpose applies to bytes as to files
    Image.fromarray(rng().integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path, exif=exif)
    for processor in (ImageProcessor(size=8), ImageProcessor(open_clip=OpenClipTransform(size=8)),
                      NaFlexImageProcessor(patch_size=4, max_num_patches=4)):
        from_file = processor([str(path), str(path)])
        from_bytes = processor([EncodedImage("sample 7", path.read_bytes()), str(path)])
        pairs = [(from_bytes[k], from_file[k]) for k in from_file] if isinstance(from_file, dict) \
            else [(from_bytes, from_file)]
        for a, b in pairs:
            np.testing.assert_array_equal(a, b)
        with pytest.raises(InputError, match=r"image 1 \(sample 9\)"):
            processor([str(path), EncodedImage("sample 9", b"not an image")])


# -------------------------------------------------------------------------------- float32-safe settings


BAD_STATS = [
    (dict(image_std=1e-300), "image_std"),
    (dict(image_std=[0.5, 1e-300, 0.5]), "image_std"),
    (dict(image_std=[1e-39, 0.5, 0.5]), "image_std"),  # float32 subnormal: 0.5 / 1e-39 overflows
    (dict(image_mean=1e300), "image_mean"),
    (dict(image_mean=[0.5, -3e38, 0.5], image_std=0.5), "image_mean"),  # finite values, overflowing result
    (dict(image_std=1e300), "image_std"),
    (dict(rescale_factor=1e37), "rescale_factor"),
    (dict(rescale_factor=1e36), "rescale_factor"),  # 255e36 fits, (255e36 - 0.5) / 0.5 does not
]


@pytest.mark.parametrize("settings,field", BAD_STATS)
@pytest.mark.parametrize("cls", [ImageProcessor, NaFlexImageProcessor])
def test_settings_overflowing_float32_are_refused(cls, settings, field, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}: field '{field}'"):
        cls(**settings)
    type_name = "ViTImageProcessor" if cls is ImageProcessor else "Siglip2ImageProcessor"
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"image_processor_type": type_name, **settings}))
    for source in (path, tmp_path):
        with pytest.raises(ConfigError, match=rf"preprocessor_config\.json: field '{field}'"):
            cls.from_pretrained(source)


def test_extreme_settings_within_float32_are_kept_and_finite():
    image = rng().integers(0, 256, (12, 12, 3), dtype=np.uint8)
    for settings in (dict(image_std=1e-30), dict(image_mean=3e38, image_std=1.0), dict(rescale_factor=1e30)):
        with np.errstate(all="raise"):
            pixels = ImageProcessor(size=8, **settings)(image)
        assert np.isfinite(pixels).all()


@pytest.mark.parametrize("preprocess,field", [
    ({"std": 1e-300}, "preprocess_cfg.std"), ({"std": [0.5, 1e-40, 0.5]}, "preprocess_cfg.std"),
    ({"mean": 1e300}, "preprocess_cfg.mean"), ({"mean": [-3e38] * 3, "std": [0.1] * 3}, "preprocess_cfg.mean"),
])
def test_open_clip_settings_overflowing_float32_are_refused(preprocess, field, tmp_path):
    config = {"model_cfg": {"vision_cfg": {"image_size": 16}}, "preprocess_cfg": preprocess}
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps(config))
    for source in (tmp_path, path):
        with pytest.raises(ConfigError, match=rf"open_clip_config\.json: field '{field}'"):
            ImageProcessor.from_pretrained(source)
    with pytest.raises(ConfigError, match=rf"^OpenClipTransform: field '{field.split('.')[-1]}'"):
        OpenClipTransform(size=16, **preprocess)


def test_overflow_errors_are_the_usual_settings_error():
    with pytest.raises(ConfigError) as negative:
        ImageProcessor(image_std=-1.0)
    with pytest.raises(ConfigError) as tiny:
        ImageProcessor(image_std=1e-300)
    assert type(negative.value) is type(tiny.value)
    assert str(tiny.value).startswith("ImageProcessor: field 'image_std'")
