"""dualenc: a pure-JAX vision-text dual encoder, checkpoint-compatible with transformers."""

from dualenc.config import (
    BertConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    DualEncoderConfig,
    RobertaConfig,
    Siglip2TextConfig,
    Siglip2VisionConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
    ViTConfig,
    load_config,
)
from dualenc.formats import (
    NewlyInitializedWarning,
    UnusedWeightsWarning,
    from_vision_text_pretrained,
    load_big_vision,
    load_pretrained,
    save_pretrained,
)
from dualenc.errors import CheckpointError, ConfigError, DataError, DualEncError, InputError
from dualenc.evaluate import (
    encode_images,
    encode_texts,
    retrieval_metrics,
    zero_shot_classifier,
    zero_shot_logit_rule,
    zero_shot_predict,
)
from dualenc.layers import TowerOutput
from dualenc.processing import AutoImageProcessor, EncodedImage, ImageProcessor, NaFlexImageProcessor, Processor, Tokenizer
from dualenc.model import (
    DualEncoderOutput,
    apply,
    check_inputs,
    get_image_features,
    get_text_features,
    init,
    num_params,
    stack_layers,
    unstack_layers,
)

from dualenc import ann, data, evaluate, formats, index, losses, templates, towers, train, trainer  # noqa: E402
from dualenc.towers import bert, clip_text, naflex, siglip, vit  # noqa: E402  (the tower families, as dualenc.vit etc.)

__version__ = "0.1.0"
