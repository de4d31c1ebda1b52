"""Configuration of Phi-3.5-vision, read from the official ``config.json`` as it is.

The official file is a Phi-3-mini text config plus two dicts: ``embd_layer`` (how image features are
laid out) and ``img_processor`` (the vision tower). The official model code hard-codes the vision tower
as CLIP ViT-L/14-336; we do the same, but accept an optional ``img_processor["clip_config"]`` dict of
``CLIPVisionConfig`` overrides so tests can build a small tower with the same code path.
"""

from __future__ import annotations

import logging

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config

logger = logging.getLogger(__name__)

# CLIP ViT-L/14-336 ("openai/clip-vit-large-patch14-336"), as the official modeling file hard-codes it.
CLIP_VIT_L_14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_channels=3,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
)

DEFAULT_EMBD_LAYER = dict(
    embedding_cls="image",
    hd_transform_order="sub_glb",
    projection_cls="mlp",
    use_hd_transform=True,
    with_learnable_separator=True,
)

DEFAULT_IMG_PROCESSOR = dict(
    image_dim_out=1024,
    model_name="openai/clip-vit-large-patch14-336",
    name="clip_vision_model",
    num_img_tokens=144,
)


@strict
class Phi3VConfig(Phi3Config):
    """Phi-3-mini decoder settings plus the official ``embd_layer`` and ``img_processor`` dicts.

    ``img_processor`` keys (all optional, official defaults shown by ``DEFAULT_IMG_PROCESSOR``):
    ``image_dim_out`` (CLIP width), ``num_img_tokens`` (tokens per 2x2-merged crop), ``layer_idx``
    (CLIP hidden state used, default -2), ``type_feature`` ("patch": drop the CLS token) and
    ``clip_config`` (overrides of CLIP ViT-L/14-336, for small test checkpoints).
    """

    model_type = "phi3_v"

    embd_layer: dict | None = None
    img_processor: dict | None = None

    def __post_init__(self, **kwargs):
        # The hub config.json asks for flash_attention_2, which would fail on machines without flash-attn.
        # The attention backend is the caller's choice (`attn_implementation=`, default sdpa) instead.
        if kwargs.pop("_attn_implementation", None):
            logger.info("Ignoring `_attn_implementation` from config.json; pass attn_implementation= to choose.")
        _standardize_su_rope(kwargs, self.max_position_embeddings / self.original_max_position_embeddings)
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        super().__post_init__(**kwargs)
        self._check_vision_settings()

    @property
    def vision_feature_layer(self) -> int:
        """CLIP hidden state the image features come from (-2: the output of the second-to-last layer)."""
        return self.img_processor.get("layer_idx", -2)

    @property
    def num_img_tokens(self) -> int:
        """Tokens per crop after the 2x2 merge (144 for 336-pixel crops with 14-pixel patches)."""
        return self.img_processor["num_img_tokens"]

    def clip_vision_config(self) -> CLIPVisionConfig:
        """The vision tower: CLIP ViT-L/14-336 unless ``img_processor["clip_config"]`` overrides it."""
        overrides = self.img_processor.get("clip_config") or {}
        clip_config = CLIPVisionConfig(**{**CLIP_VIT_L_14_336, **overrides})
        clip_config._attn_implementation = self._attn_implementation
        return clip_config

    def _check_vision_settings(self) -> None:
        clip = {**CLIP_VIT_L_14_336, **(self.img_processor.get("clip_config") or {})}
        checks = [
            (self.embd_layer.get("hd_transform_order") == "sub_glb", "embd_layer.hd_transform_order must be 'sub_glb'"),
            (self.embd_layer.get("use_hd_transform", True), "embd_layer.use_hd_transform must be true"),
            (self.embd_layer.get("with_learnable_separator", True), "embd_layer.with_learnable_separator must be true"),
            (self.embd_layer.get("projection_cls", "mlp") == "mlp", "embd_layer.projection_cls must be 'mlp'"),
            (self.img_processor.get("type_feature", "patch") == "patch", "img_processor.type_feature must be 'patch'"),
            (
                self.img_processor["image_dim_out"] == clip["hidden_size"],
                f"img_processor.image_dim_out ({self.img_processor['image_dim_out']}) must equal the CLIP width "
                f"({clip['hidden_size']})",
            ),
        ]
        patches_per_side = clip["image_size"] // clip["patch_size"]
        checks.append(
            (
                patches_per_side % 2 == 0 and (patches_per_side // 2) ** 2 == self.num_img_tokens,
                f"img_processor.num_img_tokens ({self.num_img_tokens}) must be (image_size / patch_size / 2)^2 = "
                f"({clip['image_size']} / {clip['patch_size']} / 2)^2",
            )
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Unsupported Phi-3.5-vision config: {message}.")


def _standardize_su_rope(kwargs: dict, context_factor: float) -> None:
    """Rename the official ``rope_scaling.type == "su"`` to "longrope" before transformers reads it.

    transformers renames "su" only after it has decided which keys a scaled RoPE needs, so an official
    config would otherwise fail validation (missing ``original_max_position_embeddings``). ``factor`` is
    the value transformers would derive itself (131072 / 4096); stating it silences a warning per load.
    """
    rope_scaling = kwargs.get("rope_scaling")
    if isinstance(rope_scaling, dict) and rope_scaling.get("type", rope_scaling.get("rope_type")) == "su":
        rope_scaling = {k: v for k, v in rope_scaling.items() if k != "type"}
        kwargs["rope_scaling"] = {"factor": context_factor, **rope_scaling, "rope_type": "longrope"}


__all__ = ["Phi3VConfig"]
