"""Phi-3.5-vision: CLIP ViT-L/14-336 + HD image embedding + the transformers Phi-3 decoder.

Module names and shapes follow the official checkpoint (``model.vision_embed_tokens.img_processor
.vision_model.*``, ``glb_GN``, ``sub_GN``, ``img_projection.{0,2}``), so an official folder loads with
``Phi3VForCausalLM.from_pretrained(path)`` and no remote code. The math follows the official
``modeling_phi3_v.py`` of microsoft/Phi-3.5-vision-instruct:

    crops --CLIP--> hidden state at layer -2, CLS dropped      [n_crops, 24*24, 1024]
          --2x2 merge (TL, TR, BL, BR)-->                      [n_crops, 12, 12, 4096]
          --tile sub-crops, sub_GN after every row; glb_GN; global view + sub_GN column-->
          [sub tokens, glb_GN, global tokens]                  [num_img_tokens, 4096]
          --img_projection (Linear, GELU, Linear)-->           [num_img_tokens, 3072]

and the features replace the token embeddings at the negative placeholder ids, in row-major order.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from .configuration import Phi3VConfig
from .processing import IGNORE_INDEX

logger = logging.getLogger(__name__)


class Phi3VVisionTower(nn.Module):
    """CLIP vision model that runs only up to the feature layer (-2) and drops the CLS token.

    All CLIP layers stay in the module (the official checkpoint stores them), but the last layer and
    ``post_layernorm`` never run: their outputs are not used, so running them would only cost time.
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        clip_config = config.clip_vision_config()
        self.vision_model = CLIPVisionModel(clip_config)
        layer_idx = config.vision_feature_layer
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k.
        self.num_layers_used = layer_idx if layer_idx >= 0 else clip_config.num_hidden_layers + 1 + layer_idx

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_crops, 3, S, S] -> patch features [n_crops, (S/patch)^2, clip_width]."""
        clip = self.vision_model
        hidden_states = clip.pre_layrnorm(clip.embeddings(pixel_values))
        for layer in clip.encoder.layers[: self.num_layers_used]:
            hidden_states = layer(hidden_states, None)
        return hidden_states[:, 1:]

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that never receive a gradient: the layers after the feature layer and post_layernorm."""
        clip = self.vision_model
        unused = [*clip.post_layernorm.parameters()]
        for layer in clip.encoder.layers[self.num_layers_used :]:
            unused.extend(layer.parameters())
        return unused


class Phi3VImageEmbedding(nn.Module):
    """Turns HD-transformed images into the token features that replace the image placeholders."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        clip_config = config.clip_vision_config()
        self.crop_size = clip_config.image_size
        self.grid = clip_config.image_size // clip_config.patch_size // 2  # merged tokens per crop side (12)
        merged_dim = 4 * clip_config.hidden_size
        self.img_processor = Phi3VVisionTower(config)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged_dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged_dim))
        self.img_projection = nn.Sequential(
            nn.Linear(merged_dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [n_images, max_crops+1, 3, S, S], image_sizes [n_images, 2] (HD canvas H, W)
        -> features [sum of num_img_tokens, hidden_size], images in order."""
        grids = self._crop_grids(pixel_values, image_sizes)
        crops_per_image = [1 + rows * cols for rows, cols in grids]
        # Only the global view and the real crops run through CLIP; the zero padding up to max_crops is skipped.
        crops = torch.cat([image[:n] for image, n in zip(pixel_values, crops_per_image)])
        dtype = self.img_processor.vision_model.embeddings.patch_embedding.weight.dtype
        merged = self._merge_2x2(self.img_processor(crops.to(dtype)))
        tokens = [
            self._hd_layout(image_crops, rows, cols)
            for image_crops, (rows, cols) in zip(merged.split(crops_per_image), grids)
        ]
        # glb_GN carries the model's compute dtype even when the projector's Linear layers are 4-bit.
        return self.img_projection(torch.cat(tokens).to(self.glb_GN.dtype))

    def blank_image_features(self) -> torch.Tensor:
        """Features of one blank single-crop image: the whole image path, for a batch that has no image."""
        reference = self.glb_GN
        pixels = torch.zeros(1, 2, 3, self.crop_size, self.crop_size, dtype=reference.dtype, device=reference.device)
        sizes = torch.tensor([[self.crop_size, self.crop_size]], device=reference.device)
        return self(pixels, sizes)

    def _crop_grids(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        if pixel_values.dim() != 5 or len(pixel_values) != len(image_sizes):
            raise ValueError(
                f"pixel_values must be [n_images, max_crops+1, 3, H, W] with one image_sizes row per image; got "
                f"pixel_values {tuple(pixel_values.shape)} and image_sizes {tuple(image_sizes.shape)}."
            )
        grids = []
        for height, width in image_sizes.tolist():
            rows, cols = height // self.crop_size, width // self.crop_size
            if rows * self.crop_size != height or cols * self.crop_size != width or rows * cols < 1:
                raise ValueError(f"image size {height}x{width} is not a grid of {self.crop_size}-pixel crops.")
            if 1 + rows * cols > pixel_values.shape[1]:
                raise ValueError(
                    f"image size {height}x{width} needs {rows * cols} crops but pixel_values holds only "
                    f"{pixel_values.shape[1] - 1}."
                )
            grids.append((rows, cols))
        return grids

    def _merge_2x2(self, features: torch.Tensor) -> torch.Tensor:
        """[n, (2g)^2, C] -> [n, g, g, 4C]; each 4C vector is the 2x2 block TL, TR, BL, BR."""
        n, _, channels = features.shape
        g = self.grid
        blocks = features.reshape(n, g, 2, g, 2, channels).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, g, g, 4 * channels)

    def _hd_layout(self, crops: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[1 + rows*cols, g, g, C] (global view first) -> [sub tokens, glb_GN, global tokens] as [N, C]."""
        g, channels = self.grid, crops.shape[-1]
        sub = crops[1:].reshape(rows, cols, g, g, channels).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, channels)
        sub = torch.cat([sub, self.sub_GN[0].expand(rows * g, 1, channels)], dim=1).reshape(-1, channels)
        glb = torch.cat([crops[0], self.sub_GN[0].expand(g, 1, channels)], dim=1).reshape(-1, channels)
        return torch.cat([sub, self.glb_GN[0], glb])


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config_class = Phi3VConfig
    config: Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Phi3VImageEmbedding):
            init.zeros_(module.glb_GN)
            init.zeros_(module.sub_GN)

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, *args, **kwargs) -> str:
        # flash-attn is an optional GPU extra: without it, say so and use sdpa rather than fail mid-setup.
        if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
            logger.warning(
                "attn_implementation='flash_attention_2' was requested but the flash-attn package is not "
                "installed (or there is no CUDA GPU); using 'sdpa' instead. Install it on a GPU machine with "
                "`pip install -r requirements-gpu.txt`."
            )
            attn_implementation = "sdpa"
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)


class Phi3VModel(Phi3Model, Phi3VPreTrainedModel):
    """The Phi-3 decoder (``embed_tokens``, ``layers``, ``norm``) plus ``vision_embed_tokens``."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.post_init()  # again, now that the vision tower exists, so it is initialised and registered

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings, with image features written at the negative placeholder ids (row-major)."""
        is_image = input_ids < 0
        inputs_embeds = self.embed_tokens(input_ids.clamp(min=0))
        num_placeholders = int(is_image.sum())
        if num_placeholders:
            if pixel_values is None or image_sizes is None:
                raise ValueError(
                    f"input_ids hold {num_placeholders} image placeholder tokens but pixel_values and "
                    "image_sizes were not given."
                )
            features = self.vision_embed_tokens(pixel_values, image_sizes).to(inputs_embeds.dtype)
            if features.shape[0] != num_placeholders:
                raise ValueError(
                    f"Image features and image tokens do not match: tokens: {num_placeholders}, features "
                    f"{features.shape[0]}. Build input_ids with the Phi3VProcessor of the same num_crops."
                )
            inputs_embeds = inputs_embeds.masked_scatter(is_image.unsqueeze(-1), features)
        elif self.training and any(p.requires_grad for p in self.vision_embed_tokens.parameters()):
            # DDP and DeepSpeed need every trainable parameter in every backward pass, on every rank: a batch
            # without images runs the image path once on a blank crop and adds it times zero (zero gradient).
            inputs_embeds = inputs_embeds + 0.0 * self.vision_embed_tokens.blank_image_features().sum()
        return self.embed_dropout(inputs_embeds)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        if input_ids is not None:
            if inputs_embeds is not None:
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        return super().forward(inputs_embeds=inputs_embeds, **kwargs)


class Phi3VForCausalLM(Phi3ForCausalLM, Phi3VPreTrainedModel):
    """Phi-3.5-vision with the LM head; ``generate`` works with images, the KV cache and left padding."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        # Skip Phi3ForCausalLM.__init__, which would first build a text-only Phi3Model.
        PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ):
        """input_ids [B, L] with -k placeholders for image k; pixel_values [n_images, crops+1, 3, S, S];
        image_sizes [n_images, 2]; labels [B, L] with -100 where no loss is taken.

        In training mode with labels, the LM head runs only at the positions that predict a label: the loss
        and its gradients are the same, and the [B, L, 32064] logits (fp32 for the loss, ~0.3 GB a sample at
        num_crops 16, where nearly every position is an image token) are never made. ``logits`` then holds
        those positions only, flattened to [supervised tokens, vocab]. (Equal draw for draw unless LoRA
        dropout is set on ``lm_head``, where the dropout masks fall on other positions: equal in expectation.)"""
        keep = kwargs.get("logits_to_keep", 0)
        keeps_all = isinstance(keep, int) and keep == 0  # the caller did not choose positions itself
        if self.training and labels is not None and keeps_all and "shift_labels" not in kwargs:
            # position t predicts labels[t + 1]; the last position predicts nothing
            shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            supervised = shift_labels != IGNORE_INDEX
            kwargs.update(logits_to_keep=supervised, shift_labels=shift_labels[supervised])
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            labels=labels,
            **kwargs,
        )


__all__ = ["Phi3VForCausalLM", "Phi3VModel", "Phi3VPreTrainedModel", "Phi3VImageEmbedding"]
