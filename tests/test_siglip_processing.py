"""SigLIP's image processor and SigLIP 2's NaFlex processor against transformers' PIL backends (the *Pil classes)."""

import json

import numpy as np
import pytest
import transformers
from conftest import max_diff
from PIL import Image
from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

from dualenc.errors import ConfigError, InputError
from dualenc.processing import AutoImageProcessor, ImageProcessor, NaFlexImageProcessor
from dualenc.processing.naflex import target_size
from dualenc.processing.processor import image_inputs, load_image_processor

NAFLEX_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


@pytest.fixture(scope="module")
def photos():
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]  # 640x427 each


def noise(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def shapes_of(photos):
    """Real photo content at different aspect ratios: wide, tall, square, tiny, odd-sized, and the whole photos."""
    a, b = photos
    return [a.crop((0, 100, 640, 190)), b.crop((200, 0, 260, 427)), a.crop((100, 50, 400, 350)),
            b.crop((300, 200, 309, 205)), a.crop((13, 7, 90, 50)), a, b]


def write_config(path, settings):
    path.mkdir(parents=True, exist_ok=True)
    (path / "preprocessor_config.json").write_text(json.dumps(settings))
    return path


# ------------------------------------------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("settings", [
    {},  # transformers' class defaults: 224x224 bicubic, RGB conversion, mean/std 0.5
    {"size": {"height": 48, "width": 64}, "resample": 2, "image_mean": [0.3, 0.4, 0.5]},
    {"size": 40},  # an int is the shortest edge for SigLIP (default_to_square false), not a square
], ids=["defaults", "rect", "int-size"])
def test_siglip_matches_transformers(settings, photos, tmp_path):
    path = write_config(tmp_path / "siglip", {"image_processor_type": "SiglipImageProcessor", **settings})
    ours = ImageProcessor.from_pretrained(path)
    ref = transformers.SiglipImageProcessorPil.from_pretrained(path)
    assert ours.image_processor_type == "SiglipImageProcessor" and ours.do_convert_rgb and not ours.do_center_crop
    gray = photos[0].crop((0, 0, 33, 21)).convert("L")
    rgba = Image.fromarray(noise(17, 29, 4), "RGBA")
    for images in ([photos[0], photos[1]], [photos[0].crop((5, 9, 301, 200))], [gray], [rgba],
                   [np.asarray(photos[1])], [noise(31, 13)]):
        expected = ref(images, return_tensors="np")["pixel_values"]
        got = ours(images)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert max_diff(got, expected) <= 1e-5
    assert ours([gray]).shape[1] == 3  # converted to RGB, as transformers' SigLIP does (ViT's default does not)
    if not settings:
        assert ours(photos).shape == (2, 3, 224, 224)
    if "size" in settings and isinstance(settings["size"], int):
        assert ours([photos[0]]).shape == (1, 3, 40, 59)  # shortest edge 40, aspect kept


def test_siglip_saved_by_transformers_and_back(photos, tmp_path):
    transformers.SiglipImageProcessorPil(size={"height": 36, "width": 36}).save_pretrained(tmp_path / "ref")
    ours = ImageProcessor.from_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    again = transformers.AutoImageProcessor.from_pretrained(tmp_path / "ours", use_fast=False)
    assert type(again).__name__ == "SiglipImageProcessorPil"
    np.testing.assert_allclose(ours(photos), again(photos, return_tensors="np")["pixel_values"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ SigLIP 2 NaFlex


def assert_same_naflex(ours, ref, images):
    expected = ref(images, return_tensors="np")
    got = ours(images)
    assert set(got) == set(NAFLEX_KEYS)
    assert got["pixel_values"].dtype == np.float32
    assert got["pixel_attention_mask"].dtype == np.int32 and got["spatial_shapes"].dtype == np.int32
    for key in NAFLEX_KEYS:
        assert got[key].shape == expected[key].shape, key
    np.testing.assert_array_equal(got["spatial_shapes"], expected["spatial_shapes"])
    np.testing.assert_array_equal(got["pixel_attention_mask"], expected["pixel_attention_mask"])
    diff = max_diff(got["pixel_values"], expected["pixel_values"])
    assert diff <= 1e-5, diff
    return got


def test_naflex_photos_match_transformers(photos, tmp_path):
    transformers.Siglip2ImageProcessorPil().save_pretrained(tmp_path)
    ours = NaFlexImageProcessor.from_pretrained(tmp_path)
    ref = transformers.Siglip2ImageProcessorPil.from_pretrained(tmp_path)
    assert (ours.patch_size, ours.max_num_patches, ours.resample) == (16, 256, 2)
    images = shapes_of(photos)
    got = assert_same_naflex(ours, ref, images)
    n = len(images)
    assert got["pixel_values"].shape == (n, 256, 16 * 16 * 3)
    rows, cols = got["spatial_shapes"].T
    assert cols[0] > 3 * rows[0] and rows[1] > 3 * cols[1] and rows[2] == cols[2] == 16  # wide, tall, square
    assert np.all(rows * cols <= 256) and np.all(rows * cols > 200)  # resized up or down to fill the budget
    np.testing.assert_array_equal(got["pixel_attention_mask"].sum(1), rows * cols)
    for i in range(n):  # padding is zeros
        assert not got["pixel_values"][i, rows[i] * cols[i]:].any()
    # the first patch is the top-left 16x16 corner of the resized image, (row, column, channel) order
    first = ref.resize(np.moveaxis(np.asarray(images[2]), -1, 0), transformers.image_utils.SizeDict(
        height=256, width=256), resample=2)[:, :16, :16] / 255 * 2 - 1
    np.testing.assert_allclose(got["pixel_values"][2, 0], np.moveaxis(first, 0, -1).ravel(), atol=1e-5)


def test_naflex_defaults_are_transformers(photos, tmp_path):
    """A config with only the type: every missing setting means what it means to transformers."""
    path = write_config(tmp_path, {"image_processor_type": "Siglip2ImageProcessor", "max_num_patches": 64})
    ours = NaFlexImageProcessor.from_pretrained(path)
    assert_same_naflex(ours, transformers.Siglip2ImageProcessorPil.from_pretrained(path), shapes_of(photos)[:5])
    assert ours.to_dict() == {**NaFlexImageProcessor().to_dict(), "max_num_patches": 64}


def test_naflex_other_settings_inputs_and_paths(photos, tmp_path):
    settings = dict(patch_size=14, max_num_patches=64, resample=3, do_convert_rgb=True, image_mean=[0.4, 0.5, 0.6],
                    image_std=[0.2, 0.3, 0.25])
    ours = NaFlexImageProcessor(**settings)
    ours.save_pretrained(tmp_path / "cfg")
    ref = transformers.Siglip2ImageProcessorPil.from_pretrained(tmp_path / "cfg")
    assert (ref.patch_size, ref.max_num_patches, ref.resample, ref.do_convert_rgb) == (14, 64, 3, True)
    photos[1].crop((0, 0, 200, 120)).save(tmp_path / "photo.png")
    gray = photos[0].crop((40, 40, 140, 75)).convert("L")
    rgba = Image.fromarray(noise(23, 57, 4, seed=1), "RGBA")
    images = shapes_of(photos)[:5] + [gray, rgba, np.asarray(photos[0])[:50, :70],
                                      np.random.default_rng(2).random((20, 30, 3)).astype(np.float32)]
    got = assert_same_naflex(ours, ref, images)
    assert got["pixel_values"].shape == (len(images), 64, 14 * 14 * 3)
    from_path = ours(str(tmp_path / "photo.png"))
    from_pil = ours(Image.open(tmp_path / "photo.png"))
    for key in NAFLEX_KEYS:
        np.testing.assert_array_equal(from_path[key], from_pil[key])
    stacked = ours(np.stack([noise(30, 40), noise(30, 40, seed=1)]))
    assert stacked["pixel_values"].shape[0] == 2


def test_naflex_without_resize_matches_transformers(tmp_path):
    ours = NaFlexImageProcessor(patch_size=8, max_num_patches=30, do_resize=False)
    ours.save_pretrained(tmp_path)
    ref = transformers.Siglip2ImageProcessorPil.from_pretrained(tmp_path)
    got = assert_same_naflex(ours, ref, [noise(16, 40), noise(40, 48, seed=3)])
    np.testing.assert_array_equal(got["spatial_shapes"], [[2, 5], [5, 6]])
    with pytest.raises(InputError, match=r"image 0 .*multiples of patch_size 8"):
        ours(noise(17, 40))
    with pytest.raises(InputError, match=r"image 1 .*at most max_num_patches 30"):
        ours([noise(16, 16), noise(48, 48)])


def test_target_size_is_transformers():
    r = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(v) for v in r.integers(1, 3000, 2))
        patch, n = int(r.choice([8, 14, 16, 32])), int(r.integers(1, 1025))
        ours = target_size(height, width, patch, n)
        assert ours == get_image_size_for_max_num_patches(height, width, patch, n)
        assert ours[0] % patch == 0 and ours[1] % patch == 0 and (ours[0] // patch) * (ours[1] // patch) <= n


def test_naflex_config_round_trip_and_transformers_classes(tmp_path):
    ours = NaFlexImageProcessor(patch_size=32, max_num_patches=100, rescale_factor=0.5, do_normalize=False)
    ours.save_pretrained(tmp_path, processor_class="Siglip2Processor")
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Siglip2ImageProcessor" and saved["processor_class"] == "Siglip2Processor"
    assert NaFlexImageProcessor.from_pretrained(tmp_path).to_dict() == ours.to_dict()
    for cls in (transformers.Siglip2ImageProcessor, transformers.Siglip2ImageProcessorPil):
        ref = cls.from_pretrained(tmp_path)
        assert (ref.patch_size, ref.max_num_patches, ref.rescale_factor, ref.do_normalize) == (32, 100, 0.5, False)
    assert type(transformers.AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)).__name__ == \
        "Siglip2ImageProcessorPil"
    # transformers 5 nests a processor's image settings in processor_config.json and reads that entry first
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {
        **ours.to_dict(), "max_num_patches": 49}}))
    assert NaFlexImageProcessor.from_pretrained(tmp_path).max_num_patches == 49
    ours.save_pretrained(tmp_path)
    assert NaFlexImageProcessor.from_pretrained(tmp_path).max_num_patches == 100


def test_loaders_point_to_each_other(tmp_path):
    transformers.Siglip2ImageProcessorPil().save_pretrained(tmp_path / "siglip2")
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json.*'image_processor_type'.*NaFlexImageProc"):
        ImageProcessor.from_pretrained(tmp_path / "siglip2")
    assert isinstance(load_image_processor(tmp_path / "siglip2"), NaFlexImageProcessor)  # as Processor loads it
    for kind in ("SiglipImageProcessor", "ViTImageProcessor"):
        path = write_config(tmp_path / kind, {"image_processor_type": kind})
        with pytest.raises(ConfigError, match=r"preprocessor_config\.json.*'image_processor_type'.*ImageProcessor"):
            NaFlexImageProcessor.from_pretrained(path)
        ImageProcessor.from_pretrained(path)


def test_auto_image_processor_reads_every_kind_as_transformers_chooses(tmp_path, monkeypatch):
    from dualenc.processing import processor as processor_module

    transformers.Siglip2ImageProcessorPil(max_num_patches=64).save_pretrained(tmp_path / "siglip2")
    nested = {"processor_class": "Siglip2Processor", "image_processor": {  # as transformers 5 saves a processor
        **transformers.Siglip2ImageProcessorPil(max_num_patches=49).to_dict(),
        "image_processor_type": "Siglip2ImageProcessor"}}
    (tmp_path / "siglip2-nested").mkdir()
    (tmp_path / "siglip2-nested" / "processor_config.json").write_text(json.dumps(nested))
    for kind in ("SiglipImageProcessorPil", "CLIPImageProcessorPil", "ViTImageProcessorPil"):
        getattr(transformers, kind)(size={"height": 40, "width": 40}).save_pretrained(tmp_path / kind)
    (tmp_path / "open_clip").mkdir()
    (tmp_path / "open_clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "vision_cfg": {"image_size": 32}}, "preprocess_cfg": {"resize_mode": "squash"}}))
    image = noise(30, 50)
    for name in ("siglip2", "siglip2-nested", "SiglipImageProcessorPil", "CLIPImageProcessorPil",
                 "ViTImageProcessorPil", "open_clip"):
        got = AutoImageProcessor.from_pretrained(tmp_path / name)
        if name != "open_clip":  # the class transformers' AutoImageProcessor picks, and its settings
            ref = transformers.AutoImageProcessor.from_pretrained(tmp_path / name, use_fast=False)
            assert type(ref).__name__ == {"siglip2": "Siglip2ImageProcessorPil",
                                          "siglip2-nested": "Siglip2ImageProcessorPil"}.get(name, name)
        if name.startswith("siglip2"):
            expected = NaFlexImageProcessor.from_pretrained(tmp_path / name)
            assert got.max_num_patches == ref.max_num_patches == {"siglip2": 64, "siglip2-nested": 49}[name]
        else:
            expected = ImageProcessor.from_pretrained(tmp_path / name)
            assert (got.open_clip is not None) == (name == "open_clip")
            assert name == "open_clip" or got.image_processor_type + "Pil" == name
        assert type(got) is type(expected) and got.to_dict() == expected.to_dict(), name
        out, want = image_inputs(got, image), image_inputs(expected, image)
        assert set(out) == set(want) and all(np.array_equal(out[k], want[k]) for k in want)
    files = [tmp_path / "siglip2" / "preprocessor_config.json", tmp_path / "open_clip" / "open_clip_config.json"]
    assert [type(AutoImageProcessor.from_pretrained(f)) for f in files] == [NaFlexImageProcessor, ImageProcessor]
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoImageProcessor()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        AutoImageProcessor.from_pretrained(tmp_path)
    asked = []  # a hub id and its revision go to dualenc.hub.resolve

    def resolve(path, revision=None):
        asked.append((path, revision))
        return str(tmp_path / "siglip2")

    monkeypatch.setattr(processor_module, "resolve", resolve)
    assert isinstance(AutoImageProcessor.from_pretrained("google/siglip2-x", revision="v1"), NaFlexImageProcessor)
    assert asked == [("google/siglip2-x", "v1")]


@pytest.mark.parametrize("field,value", [
    ("patch_size", 0), ("patch_size", 2.5), ("max_num_patches", 0), ("max_num_patches", True),
    ("max_num_patches", 1 << 17), ("resample", 9), ("image_mean", [0.5, 0.5]), ("image_std", [0.5, -1, 0.5]),
    ("rescale_factor", "1/255"), ("do_convert_rgb", "yes"), ("input_data_format", "channels_first"),
])
def test_naflex_invalid_config_names_field_and_file(field, value, tmp_path):
    write_config(tmp_path, {**NaFlexImageProcessor().to_dict(), field: value})
    with pytest.raises(ConfigError, match=rf"preprocessor_config\.json.*'{field}'"):
        NaFlexImageProcessor.from_pretrained(tmp_path)
    if field != "input_data_format":  # a file-only key
        with pytest.raises(ConfigError, match=rf"^NaFlexImageProcessor: field '{field}'"):
            NaFlexImageProcessor(**{field: value})


def test_naflex_bad_images_name_input_and_index(tmp_path):
    ours = NaFlexImageProcessor(patch_size=4, max_num_patches=16)
    with pytest.raises(InputError, match="empty list"):
        ours([])
    with pytest.raises(InputError, match="image 1: expected a PIL image"):
        ours([noise(8, 8), 3.0])
    with pytest.raises(FileNotFoundError, match="image 0"):
        ours(str(tmp_path / "missing.png"))
    gray = Image.fromarray(noise(8, 8, 1)[..., 0])
    with pytest.raises(ValueError):  # transformers refuses it: no RGB conversion by default
        transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=16)(gray)
    for key, value in ours(gray).items():  # dualenc converts it, as the 3-value image_mean needs RGB
        np.testing.assert_array_equal(value, ours(gray.convert("RGB"))[key])
    one_channel = NaFlexImageProcessor(patch_size=4, max_num_patches=16, image_mean=0.5, image_std=0.5)
    assert one_channel(gray)["pixel_values"].shape == (1, 16, 16)
    with pytest.raises(InputError, match="different patch sizes"):
        one_channel([gray, noise(8, 8)])
    assert ours(noise(1, 1))["spatial_shapes"].tolist() == [[4, 4]]  # one pixel, scaled up to fill the budget
