"""Zero-shot prompt templates: named sets of strings with one "{}" (or CLIP_benchmark's "{c}") for the class name."""

from __future__ import annotations

from typing import Sequence

from dualenc.errors import InputError

# dualenc's default: a short ensemble in the spirit of CLIP's.
DEFAULT = (
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.",
    "a cropped photo of a {}.", "a bright photo of a {}.", "a dark photo of a {}.", "a blurry photo of a {}.",
    "a low resolution photo of a {}.", "a good photo of a {}.", "a photo of the {}.", "a photo of one {}.",
    "a drawing of a {}.", "a rendering of a {}.", "a black and white photo of a {}.", "itap of a {}.", "a {}.",
    "{}",
)
# The 80 templates OpenAI's CLIP paper used for ImageNet zero-shot (as open_clip ships them), in their order.
OPENAI_IMAGENET = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
# The 7 of them OpenAI's CLIP notebook found to do as well on ImageNet (open_clip's "simple" set).
OPENAI_IMAGENET_7 = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)

TEMPLATE_SETS = {"default": DEFAULT, "openai_imagenet": OPENAI_IMAGENET, "openai_imagenet_7": OPENAI_IMAGENET_7}


def _placeholder(template) -> str | None:
    """The template's one placeholder, "{}" or "{c}"; None when it has not exactly one and no other brace."""
    if not isinstance(template, str):
        return None
    for mark in ("{}", "{c}"):
        rest = template.replace(mark, "")
        if template.count(mark) == 1 and "{" not in rest and "}" not in rest:
            return mark
    return None


def fill(template: str, name: str) -> str:
    """The prompt of one class: the template's "{}" or "{c}" replaced by `name` (as str.format and
    CLIP_benchmark's template.format(c=name) do; a name's own braces are kept as they are)."""
    mark = _placeholder(template)
    if mark is None:
        raise InputError(f"template {template!r} must be a string with exactly one '{{}}' or '{{c}}' for the class "
                         f"name")
    return template.replace(mark, name)


def resolve(templates: str | Sequence[str]) -> list[str]:
    """A template set by name (see TEMPLATE_SETS), or the given templates, checked: each a string with exactly one
    "{}" or one "{c}" (CLIP_benchmark's form) for the class name, and no other brace; fill() fills either."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise InputError(f"templates {templates!r} is not a known template set; known: {sorted(TEMPLATE_SETS)} "
                             f"(or pass a list of format strings)")
        return list(TEMPLATE_SETS[templates])
    templates = list(templates)
    if not templates:
        raise InputError("templates is empty")
    for i, t in enumerate(templates):
        if _placeholder(t) is None:
            raise InputError(f"templates[{i}] = {t!r} must be a string with exactly one '{{}}' or '{{c}}' for the "
                             f"class name")
    return templates
