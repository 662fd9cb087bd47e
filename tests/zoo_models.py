"""Small configurations of the architectures the benchmark zoo scores at full size.

Each builder returns (model, example batch). Weights are random; float64 and eval mode are
the caller's business. Hugging Face models are wrapped to take token ids and return logits.
"""

from __future__ import annotations

import torch
from torch import nn

BATCH = 3
CLASSES = 5


def images(size: int, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, channels, size, size, generator=generator)


def tokens(vocab: int = 40, length: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (BATCH, length), generator=generator)
    ids[0, 2] = ids[0, 5]  # a repeated token: the embedding rule's cross terms count
    return ids


# --- torchvision ---------------------------------------------------------------------------


def tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)]
    return ConvNeXt(settings, num_classes=CLASSES), images(32)


def tv_vit():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=24,
        num_classes=CLASSES,
    )
    return model, images(32)


def tv_swin():
    from torchvision.models import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[2, 2],
        num_classes=CLASSES,
    )
    return model, images(32)


# --- timm ------------------------------------------------------------------------------------


def _timm(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


def timm_efficientnet_b0():
    # efficientnet_b0's own builder, narrower and shallower (the registered name fixes both
    # multipliers at 1.0): the same stem, MBConv/SE blocks, BatchNormAct2d and head
    from timm.models.efficientnet import _gen_efficientnet

    model = _gen_efficientnet(
        "efficientnet_b0", channel_multiplier=0.25, depth_multiplier=0.3, num_classes=CLASSES
    )
    return model, images(16)


def timm_convnext_nano():
    return _timm("convnext_nano", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), images(32)


def timm_convnext_small():
    return _timm("convnext_small", depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)), images(32)


def timm_vit_small():
    model = _timm(
        "vit_small_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=16, num_heads=2
    )
    return model, images(32)


def timm_deit_tiny():
    model = _timm(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=16, num_heads=2
    )
    return model, images(32)


def timm_mobilevitv2():
    # mobilevitv2_050's configuration at a quarter of the width instead of half
    from timm.models.byobnet import ByobNet
    from timm.models.mobilevit import _mobilevitv2_cfg

    return ByobNet(_mobilevitv2_cfg(multiplier=0.25), num_classes=CLASSES), images(16)


# --- Hugging Face ------------------------------------------------------------------------


class TokenClassifier(nn.Module):
    """input_ids (and an all-ones attention mask) -> .logits of a sequence classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask).logits


def _hf(config_name: str, model_name: str, **config) -> tuple[nn.Module, torch.Tensor]:
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=40, num_labels=CLASSES, pad_token_id=0, **config
    )
    return TokenClassifier(getattr(transformers, model_name)(config)), tokens()


SMALL = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
)


def hf_bert():
    return _hf("BertConfig", "BertForSequenceClassification", **SMALL)


def hf_roberta():
    return _hf("RobertaConfig", "RobertaForSequenceClassification", **SMALL)


def hf_albert():
    return _hf("AlbertConfig", "AlbertForSequenceClassification", embedding_size=8, **SMALL)


def hf_distilbert():
    return _hf(
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dim=16,
        n_layers=2,
        n_heads=2,
        hidden_dim=24,
        max_position_embeddings=16,
    )


def hf_gpt2():
    return _hf(
        "GPT2Config",
        "GPT2ForSequenceClassification",
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
    )


ZOO = {
    "torchvision-convnext": tv_convnext,
    "torchvision-vit": tv_vit,
    "torchvision-swin": tv_swin,
    "timm-efficientnet_b0": timm_efficientnet_b0,
    "timm-convnext_nano": timm_convnext_nano,
    "timm-convnext_small": timm_convnext_small,
    "timm-vit_small": timm_vit_small,
    "timm-deit_tiny": timm_deit_tiny,
    "timm-mobilevitv2": timm_mobilevitv2,
    "hf-bert": hf_bert,
    "hf-distilbert": hf_distilbert,
    "hf-albert": hf_albert,
    "hf-gpt2": hf_gpt2,
    "hf-roberta": hf_roberta,
}
