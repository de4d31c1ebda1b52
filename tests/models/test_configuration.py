"""Phi3VConfig: read from the official config.json keys, defaults filled in, unsupported layouts refused."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import AutoConfig

from phi3v import Phi3VConfig
from phi3v.models.configuration import CLIP_VIT_L_14_336, DEFAULT_EMBD_LAYER, DEFAULT_IMG_PROCESSOR

HEAD_DIM = 3072 // 32
SHORT_FACTOR = [1.0 + 0.01 * i for i in range(HEAD_DIM // 2)]
LONG_FACTOR = [1.5 + 0.5 * i for i in range(HEAD_DIM // 2)]

# The keys of microsoft/Phi-3.5-vision-instruct's config.json, as the hub file spells them.
OFFICIAL = {
    "_name_or_path": "Phi-3.5-vision-instruct",
    "architectures": ["Phi3VForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    },
    "bos_token_id": 1,
    "embd_layer": {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    },
    "embd_pdrop": 0.0,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "img_processor": {
        "image_dim_out": 1024,
        "model_name": "openai/clip-vit-large-patch14-336",
        "name": "clip_vision_model",
        "num_img_tokens": 144,
    },
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "model_type": "phi3_v",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": LONG_FACTOR, "short_factor": SHORT_FACTOR, "type": "su"},
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1",
    "use_cache": True,
    "vocab_size": 32064,
    "_attn_implementation": "flash_attention_2",
}


def official(**changes) -> dict:
    """The official dict with nested ``changes`` ({"img_processor": {"num_img_tokens": 100}} changes one key)."""
    config = copy.deepcopy(OFFICIAL)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_official_config_json_loads_as_it_is(tmp_path):
    config = AutoConfig.from_pretrained(write_config(tmp_path / "official", OFFICIAL))
    assert type(config) is Phi3VConfig and config.model_type == "phi3_v"
    sizes = (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.pad_token_id)
    assert sizes == (3072, 32, 32064, 32000)
    assert config.embd_layer == OFFICIAL["embd_layer"]
    assert config.img_processor == OFFICIAL["img_processor"]
    assert (config.num_img_tokens, config.vision_feature_layer) == (144, -2)


def test_su_rope_becomes_longrope_with_the_official_factors(tmp_path):
    config = AutoConfig.from_pretrained(write_config(tmp_path / "official", OFFICIAL))
    rope = config.rope_parameters
    assert rope["rope_type"] == "longrope"
    assert rope["factor"] == pytest.approx(131072 / 4096)  # what transformers would derive, stated
    assert rope["short_factor"] == SHORT_FACTOR and rope["long_factor"] == LONG_FACTOR
    assert rope["original_max_position_embeddings"] == 4096 and rope["rope_theta"] == 10000.0


def test_the_hub_files_flash_attention_request_is_ignored(tmp_path):
    config = AutoConfig.from_pretrained(write_config(tmp_path / "official", OFFICIAL))
    assert config._attn_implementation in (None, "sdpa")  # the caller's attn_implementation= decides


def test_the_vision_tower_is_clip_vit_l_14_336_unless_overridden():
    clip = Phi3VConfig(**official()).clip_vision_config()
    for key, value in CLIP_VIT_L_14_336.items():
        assert getattr(clip, key) == value, key
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
             "image_size": 56, "patch_size": 14}  # fmt: skip
    config = Phi3VConfig(**official(img_processor={"image_dim_out": 64, "num_img_tokens": 4, "clip_config": small}))
    clip = config.clip_vision_config()
    assert (clip.hidden_size, clip.num_hidden_layers, clip.image_size, clip.patch_size) == (64, 3, 56, 14)
    assert clip.hidden_act == "quick_gelu"  # the rest stays ViT-L/14-336's
    assert config.num_img_tokens == 4


def test_the_vision_tower_uses_the_models_attention():
    config = Phi3VConfig(**official())
    config._attn_implementation = "eager"
    assert config.clip_vision_config()._attn_implementation == "eager"


def test_missing_vision_dicts_get_the_official_defaults():
    bare = {k: v for k, v in OFFICIAL.items() if k not in ("embd_layer", "img_processor")}
    config = Phi3VConfig(**bare)
    assert config.embd_layer == DEFAULT_EMBD_LAYER and config.img_processor == DEFAULT_IMG_PROCESSOR
    partial = Phi3VConfig(**official(img_processor={"layer_idx": -1}))
    assert partial.vision_feature_layer == -1
    assert partial.img_processor == {**DEFAULT_IMG_PROCESSOR, "layer_idx": -1}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"embd_layer": {"hd_transform_order": "glb_sub"}}, "hd_transform_order must be 'sub_glb'"),
        ({"embd_layer": {"use_hd_transform": False}}, "use_hd_transform must be true"),
        ({"embd_layer": {"with_learnable_separator": False}}, "with_learnable_separator must be true"),
        ({"embd_layer": {"projection_cls": "linear"}}, "projection_cls must be 'mlp'"),
        ({"img_processor": {"type_feature": "cls_patch"}}, "type_feature must be 'patch'"),
        ({"img_processor": {"image_dim_out": 768}}, r"image_dim_out \(768\) must equal the CLIP width \(1024\)"),
        ({"img_processor": {"num_img_tokens": 576}}, r"num_img_tokens \(576\) must be \(image_size / patch_size / 2\)"),
        (
            {"img_processor": {"num_img_tokens": 4, "clip_config": {"image_size": 42, "patch_size": 14}}},
            r"num_img_tokens \(4\) must be .* = \(42 / 14 / 2\)\^2",  # 3 patches a side: no 2x2 merge
        ),
    ],
    ids=["order", "hd", "separator", "projection", "feature", "width", "tokens", "odd_patches"],
)
def test_unsupported_layouts_are_refused(changes, message):
    with pytest.raises(ValueError, match=f"Unsupported Phi-3.5-vision config: .*{message}"):
        Phi3VConfig(**official(**changes))


def test_the_supported_values_are_accepted_when_spelled_out():
    config = Phi3VConfig(**official(img_processor={"type_feature": "patch", "layer_idx": -2}))
    assert config.img_processor["type_feature"] == "patch"


def test_to_dict_and_from_dict_round_trip():
    config = Phi3VConfig(**official(img_processor={"layer_idx": -3}))
    data = config.to_dict()
    assert data["model_type"] == "phi3_v"
    again = Phi3VConfig.from_dict(data)
    assert again.to_dict() == data
    assert again.rope_parameters == config.rope_parameters and again.vision_feature_layer == -3


def test_save_pretrained_round_trip(tmp_path):
    config = Phi3VConfig(**official())
    config.save_pretrained(tmp_path / "saved")
    again = AutoConfig.from_pretrained(tmp_path / "saved")
    assert type(again) is Phi3VConfig
    where = {"_name_or_path", "transformers_version"}  # where and by what it was saved
    assert {k: v for k, v in again.to_dict().items() if k not in where} == {
        k: v for k, v in config.to_dict().items() if k not in where
    }
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["img_processor"] == OFFICIAL["img_processor"]
