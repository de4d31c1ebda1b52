"""The two official checkpoints this code trains, and how their folders differ.

microsoft/Phi-3.5-vision-instruct and its predecessor microsoft/Phi-3-vision-128k-instruct (the model the original
recipe's DocVQA and Hateful Memes tables were measured on) have the same architecture, tokenizer, chat template and
image processing; they load through the same classes here. Their folders differ in what the official files say:
the LongRoPE factor lists, ``sliding_window`` (262144 and 131072), the 128k ``config.json`` lacking
``pad_token_id``, ``embd_pdrop`` and ``resid_pdrop`` (whose defaults, 32000, 0 and 0, are the 3.5 values), the
processor's default ``num_crops`` (4 and 16), and the remote-code files: the 128k model keeps its image processor
and image embedding in files of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers

OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_phi3_v.Phi3VConfig",
    "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
}


@dataclass(frozen=True)
class Family:
    name: str
    hub_id: str
    sliding_window: int  # the one trait every saved config keeps: how a folder's family is told
    num_crops: int  # the processor config's default
    remote_code: tuple[str, ...]
    image_processor_module: str  # the remote file holding Phi3VImageProcessor
    # per file, the keys the official one leaves out, with the value they then take (the classes' defaults)
    absent_keys: dict[str, dict] = field(default_factory=dict)
    has_processor_config: bool = True  # processor_config.json in the official folder
    has_generation_config: bool = True
    tokenizer_names_processor: bool = True  # its tokenizer_config.json has "processor_class"

    def official(self, filename: str, written: dict) -> dict:
        """``written`` without the keys the family's ``filename`` leaves out; such a key stays when its value is
        not the default it would take (a small test checkpoint's padding id)."""
        absent = self.absent_keys.get(filename, {})
        return {key: value for key, value in written.items() if key not in absent or value != absent[key]}

    def processor_auto_map(self) -> dict[str, str]:
        return {
            "AutoImageProcessor": f"{self.image_processor_module}.Phi3VImageProcessor",
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        }


PHI_3_5_VISION = Family(
    name="phi-3.5-vision-instruct",
    hub_id="microsoft/Phi-3.5-vision-instruct",
    sliding_window=262144,
    num_crops=4,
    remote_code=("configuration_phi3_v.py", "modeling_phi3_v.py", "processing_phi3_v.py"),
    image_processor_module="processing_phi3_v",
)
PHI_3_VISION_128K = Family(
    name="phi-3-vision-128k-instruct",
    hub_id="microsoft/Phi-3-vision-128k-instruct",
    sliding_window=131072,
    num_crops=16,
    remote_code=(
        "configuration_phi3_v.py",
        "modeling_phi3_v.py",
        "image_embedding_phi3_v.py",
        "processing_phi3_v.py",
        "image_processing_phi3_v.py",
    ),  # fmt: skip
    image_processor_module="image_processing_phi3_v",
    absent_keys={
        "config.json": {"embd_pdrop": 0.0, "pad_token_id": 32000, "resid_pdrop": 0.0},
        "preprocessor_config.json": {"do_convert_rgb": True},
    },
    has_processor_config=False,
    has_generation_config=False,
    tokenizer_names_processor=False,
)
FAMILIES = {family.name: family for family in (PHI_3_5_VISION, PHI_3_VISION_128K)}


def family_of(config) -> Family:
    """The family of a loaded Phi3VConfig, by its ``sliding_window``; Phi-3.5-vision for any other value."""
    return next((f for f in FAMILIES.values() if f.sliding_window == config.sliding_window), PHI_3_5_VISION)


def official_config(config, dtype: str) -> dict:
    """The config.json of ``config``'s family, key for key, from a loaded Phi3VConfig (transformers 5 keeps RoPE
    elsewhere)."""
    rope = config.rope_parameters
    written = {
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": config.attention_dropout,
        "auto_map": OFFICIAL_AUTO_MAP,
        "bos_token_id": config.bos_token_id,
        "embd_layer": dict(config.embd_layer),
        "embd_pdrop": config.embd_pdrop,
        "eos_token_id": config.eos_token_id,
        "hidden_act": config.hidden_act,
        "hidden_size": config.hidden_size,
        "img_processor": dict(config.img_processor),
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": "phi3_v",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "original_max_position_embeddings": config.original_max_position_embeddings,
        "pad_token_id": config.pad_token_id,
        "resid_pdrop": config.resid_pdrop,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": {"long_factor": rope["long_factor"], "short_factor": rope["short_factor"], "type": "su"},
        "rope_theta": rope["rope_theta"],
        "sliding_window": config.sliding_window,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": dtype,
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }
    return family_of(config).official("config.json", written)
