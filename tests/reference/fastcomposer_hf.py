"""FastComposer's parts run by independent implementations (transformers, diffusers, torchvision),
from the official checkpoint's own key layout, the way the reference code runs them."""
import torch
import torchvision.transforms.functional as TF  # v1, as the official code: v2's uint8 resize gives other bytes
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

IMAGE_MARKER = "<|image|>"
CONTEXT_LENGTH = 77  # SD1.5's text context; the tokenizer files ComfyUI ships set a larger model_max_length
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def part(state_dict, prefix, rename=lambda key: key):
    """The tensors under prefix, renamed; no copies (load_state_dict converts dtypes while copying)."""
    return {rename(key[len(prefix):]): tensor for key, tensor in state_dict.items() if key.startswith(prefix)}


def float64_part(state_dict, prefix):
    return {key: tensor.double() for key, tensor in part(state_dict, prefix).items()}


def built_in(dtype, make_model):
    """Construct directly in dtype, so a float64 UNet never also exists in float32."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return make_model()
    finally:
        torch.set_default_dtype(default)


def reference_tokenizer(tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens([IMAGE_MARKER], special_tokens=True)
    return tokenizer


def reference_tokenize(prompt, tokenizer):
    """The reference data pipeline: drop each marker, mark the token before it, pad to 77."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    clean_ids, positions = [], []
    for token_id in tokenizer.encode(prompt):
        if token_id == image_token_id:
            positions.append(len(clean_ids) - 1)
        else:
            clean_ids.append(token_id)
    assert len(clean_ids) <= CONTEXT_LENGTH, "the reference only handles prompts up to 77 tokens"
    clean_ids += [tokenizer.pad_token_id] * (CONTEXT_LENGTH - len(clean_ids))
    return torch.tensor([clean_ids]), positions


def text_encoder(state_dict, dtype=torch.float64):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768)
    model = built_in(dtype, lambda: CLIPTextModel(config))
    weights = part(state_dict, "text_encoder.")  # transformers 5 keeps no `text_model.` level, like the release
    weights.pop("embeddings.position_ids")
    model.load_state_dict(weights)
    return model.eval()


def vision_encoder(state_dict, dtype=torch.float64):
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
    model = built_in(dtype, lambda: CLIPVisionModelWithProjection(config))
    weights = part(state_dict, "image_encoder.")
    weights.pop("vision_model.embeddings.position_ids")
    model.load_state_dict(weights)
    return model.eval()


def preprocess(image_uint8_chw):
    """PadToSquare(fill=0) and torchvision v1's Resize((224, 224), bilinear, antialias) on uint8, then /255 and CLIP
    normalisation."""
    _, height, width = image_uint8_chw.shape
    pad = abs(height - width) // 2
    padding = [pad, 0, pad, 0] if height > width else [0, pad, 0, pad]
    image = TF.pad(image_uint8_chw, padding, fill=0)
    image = TF.resize(image, [224, 224], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(image.double() / 255.0, CLIP_MEAN, CLIP_STD)


def unet(state_dict, dtype=torch.float64):
    model = built_in(dtype, lambda: UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    model.load_state_dict(part(state_dict, "unet."))
    return model.eval()


OLD_VAE_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _new_vae_name(key):
    for old, new in OLD_VAE_ATTENTION_NAMES.items():
        key = key.replace(old, new)
    return key


def vae(state_dict, dtype=torch.float64):
    model = built_in(dtype, lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                          block_out_channels=(128, 256, 512, 512),
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4))
    model.load_state_dict(part(state_dict, "vae.", _new_vae_name))
    return model.eval()
