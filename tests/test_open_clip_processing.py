"""ImageProcessor of open_clip directories against open_clip's eval transform, and the CLIPImageProcessor it saves."""

import copy
import json

import numpy as np
import open_clip
import pytest
import transformers
from conftest import max_diff
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb

from dualenc.errors import ConfigError, InputError
from dualenc.processing import ImageProcessor, Processor
from dualenc.processing.open_clip import OpenClipTransform

MODEL_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 32, "layers": 1,
                                             "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
OTHER_STATS = dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


def write_config(path, image_size=224, preprocess=None, **top):
    """An open_clip_config.json as open_clip's save_config_for_hf writes it, in directory `path`."""
    model_cfg = copy.deepcopy(MODEL_CFG)
    model_cfg["vision_cfg"]["image_size"] = image_size
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess or {}, **top}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    return path


def on_white(image):
    """An image as dualenc's open_clip transform reads it: transparency composited onto white first, by transformers'
    convert_to_rgb (open_clip itself drops the alpha band); other images as they are."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        return Image.fromarray(convert_to_rgb(image, return_numpy=True))
    return image


def assert_same(ours, ref, images, atol=1e-5):
    for i, image in enumerate(images):
        expected = ref(on_white(image)).numpy()
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == (1,) + expected.shape, i
        assert max_diff(got[0], expected) <= atol, (i, image.mode, image.size)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torchvision's to_tensor and Normalize on one thread: several times faster on these small images."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos():
    """china.jpg and flower.jpg, cropped portrait, landscape and to odd sizes, and as grayscale and RGBA."""
    from sklearn.datasets import load_sample_images

    out = []
    for array in load_sample_images().images:
        photo = Image.fromarray(array)
        rgba = np.concatenate([array, (np.arange(array.shape[1]) % 256).astype(np.uint8)[None, :, None]
                               .repeat(array.shape[0], 0)], axis=-1)
        out += [photo, photo.crop((0, 0, 301, 427)), photo.crop((10, 5, 640, 201)), photo.crop((3, 7, 226, 230)),
                photo.crop((0, 0, 97, 63)), photo.convert("L"), photo.convert("RGBA"), Image.fromarray(rgba, "RGBA")]
    return out


@pytest.mark.parametrize("image_size", [224, [200, 160]], ids=["square", "portrait"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_photos_match_open_clip(resize_mode, interpolation, image_size, photos, tmp_path):
    stats = OTHER_STATS if isinstance(image_size, list) else {}
    preprocess = dict(resize_mode=resize_mode, interpolation=interpolation, **stats)
    ours = ImageProcessor.from_pretrained(write_config(tmp_path, image_size, preprocess))
    assert ours.open_clip is not None
    cfg = PreprocessCfg(size=image_size, **preprocess)
    assert_same(ours, image_transform_v2(cfg, is_train=False), photos)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    assert ours(photos[:3]).shape == (3, 3, height, width)


@pytest.mark.parametrize("image_size,preprocess", [
    (224, {}),  # every preprocess key missing: open_clip's defaults
    ([96, 128], {"mean": [0.5], "std": 0.25, "interpolation": "random", "size": 999, "resize_mode": None}),
    (64, {"resize_mode": "longest", "fill_color": 128, "mean": 0.3, "unknown": "ignored"}),
    ([64, 48], {"resize_mode": "longest", "interpolation": "bilinear", "fill_color": 7, "std": [0.3, 0.2, 0.1]}),
    ([48, 64], {"resize_mode": "squash", "mode": "RGB", "mean": [], "std": None}),
], ids=["defaults", "nulls-scalars-random", "longest-fill", "longest-non-square", "squash"])
def test_config_read_as_open_clip_reads_it(image_size, preprocess, photos, tmp_path):
    path = write_config(tmp_path, image_size, preprocess)
    _, _, ref = open_clip.create_model_and_transforms("local-dir:" + str(path))
    assert_same(ImageProcessor.from_pretrained(path), ref, photos[:2] + photos[4:7])


def test_paths_and_arrays_as_open_clip_images(photos, tmp_path):
    path = write_config(tmp_path / "model", 64, {"resize_mode": "longest", "fill_color": 30})
    ours = ImageProcessor.from_pretrained(path)
    ref = open_clip.create_model_and_transforms("local-dir:" + str(path))[2]
    files = [tmp_path / "rgba.png", tmp_path / "rotated.jpg", tmp_path / "gray.png"]
    photos[7].save(files[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    photos[1].save(files[1], exif=exif)
    photos[5].save(files[2])
    for file in files:
        with Image.open(file) as opened:
            expected = ref(on_white(ImageOps.exif_transpose(opened))).numpy()
        assert max_diff(ours(file)[0], expected) <= 1e-5
        assert max_diff(ours(str(file))[0], expected) <= 1e-5
    arrays = [np.asarray(photos[2]), np.asarray(photos[5]), np.asarray(photos[5])[..., None], np.asarray(photos[7])]
    for array in arrays:
        expected = ref(on_white(Image.fromarray(np.squeeze(array, -1) if array.shape[-1:] == (1,) else array))).numpy()
        assert max_diff(ours(array)[0], expected) <= 1e-5
    np.testing.assert_array_equal(ours(np.stack([arrays[0]] * 2)), ours([photos[2]] * 2))
    with pytest.raises(InputError, match="image 1: the open_clip transform takes uint8"):
        ours([arrays[0], arrays[0].astype(np.float32) / 255])
    with pytest.raises(InputError, match="image 0 .*empty"):
        ours(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(InputError, match=r"image 1 \(Image\)"):  # 1000x1 fits 64x64 as 64x0: open_clip fails too
        ours([photos[0], Image.new("RGB", (1000, 1))])


def test_config_json_decides_the_layout(tmp_path):
    """Without config.json the directory is open_clip's, whatever else it holds; with one, transformers' files win."""
    path = write_config(tmp_path / "model", 64)
    assert ImageProcessor.from_pretrained(path / "open_clip_config.json").open_clip is not None
    ImageProcessor(image_processor_type="CLIPImageProcessor", size=40, crop_size=40).save_pretrained(path)
    assert ImageProcessor.from_pretrained(path).open_clip is not None
    (path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    processor = ImageProcessor.from_pretrained(path)
    assert processor.open_clip is None and processor.size == {"shortest_edge": 40}
    (path / "preprocessor_config.json").unlink()
    (path / "processor_config.json").write_text(json.dumps({"image_processor": {"size": 32}}))
    assert ImageProcessor.from_pretrained(path).size == {"height": 32, "width": 32}


@pytest.mark.parametrize("image_size", [224, [200, 160]], ids=["square", "portrait"])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_saves_the_closest_clip_image_processor(resize_mode, image_size, photos, tmp_path):
    preprocess = dict(resize_mode=resize_mode, interpolation="bilinear", **OTHER_STATS)
    ours = ImageProcessor.from_pretrained(write_config(tmp_path / "open_clip", image_size, preprocess))
    ours.save_pretrained(tmp_path / "hf")
    ref = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf", use_fast=False)
    assert type(ref).__name__ == "CLIPImageProcessorPil"
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    assert list(ref.image_mean) == OTHER_STATS["mean"] and list(ref.image_std) == OTHER_STATS["std"]
    assert ref.resample == (2 if resize_mode != "shortest" or height == width else 3)  # see OpenClipTransform
    assert (ref.crop_size["height"], ref.crop_size["width"]) == (height, width)
    saved = ImageProcessor.from_pretrained(tmp_path / "hf")
    assert saved.open_clip is None and saved.to_dict() == ours.to_dict()
    for photo in photos[:6]:
        expected = ref(photo, return_tensors="np")["pixel_values"]
        assert max_diff(saved(photo), expected) <= 1e-5
        got = ours(photo)
        assert got.shape == expected.shape
        if resize_mode == "squash":
            assert max_diff(got, expected) <= 1e-5
        elif resize_mode == "shortest" and height == width:  # at most a one-pixel shift of the crop
            assert np.abs(got - expected).mean() <= 0.2


def test_processor_of_an_open_clip_directory(photos, tmp_path):
    path = write_config(tmp_path, 64, {"resize_mode": "squash"})
    processor = Processor.from_pretrained(path)
    ref = open_clip.create_model_and_transforms("local-dir:" + str(path))[2]
    out = processor(text=["a photo of a cat"], images=photos[:2], max_length=8)
    np.testing.assert_array_equal(out["pixel_values"], np.stack([ref(p).numpy() for p in photos[:2]]))
    assert "open_clip" in repr(processor)
    processor.save_pretrained(path)  # still an open_clip directory (no config.json): read as open_clip's
    assert Processor.from_pretrained(path).image_processor.open_clip is not None


@pytest.mark.parametrize("change,field", [
    ({"preprocess_cfg": {"resize_mode": "fit"}}, "preprocess_cfg.resize_mode"),
    ({"preprocess_cfg": {"mean": "big"}}, "preprocess_cfg.mean"),
    ({"preprocess_cfg": {"mean": ["a", 0.5, 0.5]}}, "preprocess_cfg.mean"),
    ({"preprocess_cfg": {"std": [0.5, 0.5]}}, "preprocess_cfg.std"),
    ({"preprocess_cfg": {"std": [0.5, 0.0, 0.5]}}, "preprocess_cfg.std"),
    ({"preprocess_cfg": {"interpolation": "lanczos"}}, "preprocess_cfg.interpolation"),
    ({"preprocess_cfg": {"mode": "L"}}, "preprocess_cfg.mode"),
    ({"preprocess_cfg": {"fill_color": 300}}, "preprocess_cfg.fill_color"),
    ({"preprocess_cfg": {"fill_color": 1.5}}, "preprocess_cfg.fill_color"),
    ({"preprocess_cfg": [1]}, "preprocess_cfg"),
    ({"image_size": None}, "model_cfg.vision_cfg.image_size"),
    ({"image_size": [224]}, "model_cfg.vision_cfg.image_size"),
    ({"image_size": 0}, "model_cfg.vision_cfg.image_size"),
    ({"image_size": True}, "model_cfg.vision_cfg.image_size"),
    ({"model_cfg": None}, "model_cfg"),
    ({"vision_cfg": None}, "model_cfg.vision_cfg"),
])
def test_invalid_config_names_field_and_file(change, field, tmp_path):
    path = write_config(tmp_path, change.get("image_size", 224), change.get("preprocess_cfg"))
    config = json.loads((path / "open_clip_config.json").read_text())
    if "preprocess_cfg" in change:
        config["preprocess_cfg"] = change["preprocess_cfg"]
    if change.get("image_size", 224) is None:
        del config["model_cfg"]["vision_cfg"]["image_size"]
    if "vision_cfg" in change:
        del config["model_cfg"]["vision_cfg"]
    if "model_cfg" in change:
        del config["model_cfg"]
    (path / "open_clip_config.json").write_text(json.dumps(config))
    for source in (path, path / "open_clip_config.json"):
        with pytest.raises(ConfigError, match=rf"open_clip_config\.json: field '{field}'"):
            ImageProcessor.from_pretrained(source)


def test_invalid_settings_in_code(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"open_clip_config\.json"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="'resize_mode'"):
        OpenClipTransform(size=224, resize_mode="crop")
    with pytest.raises(ConfigError, match="'size'"):
        OpenClipTransform(size=(224, 0))
    with pytest.raises(ConfigError, match="'size' cannot be set with open_clip"):
        ImageProcessor(open_clip=OpenClipTransform(size=224), size=30)
    with pytest.raises(ConfigError, match="'open_clip'"):
        ImageProcessor(open_clip={"size": 224})
    transform = OpenClipTransform(size=[96, 64], mean=0.5, std=[0.25])
    assert transform.size == (96, 64) and transform.mean == (0.5,) * 3 and transform.std == (0.25,) * 3
