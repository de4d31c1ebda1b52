"""Write a tiny checkpoint folder of either family, laid out like the official one, offline and in seconds.
(``python -m phi3v.tiny`` writes one.)

The folder holds ``config.json`` (the family's official keys, small sizes, the real LongRoPE switch at 4096
tokens), ``generation_config.json`` where the family's folder has one, ``model.safetensors`` (random weights), a
small BPE tokenizer with the Phi-3 special tokens, their official ids' order and flags and the official chat
template, and the family's processor configuration. It loads through exactly the code path of the official
checkpoint. The remote-code files are not written, so neither are the ``auto_map`` entries that would name them.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .configuration import Phi3VConfig
from .families import PHI_3_5_VISION, PHI_3_VISION_128K, Family, official_config
from .modeling import Phi3VForCausalLM
from .processing import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

# The official tokenizer_config.json's chat template (no BOS, no default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)

# Added tokens of the official tokenizer, in id order, with their rstrip flag (all are special).
_PLACEHOLDERS = [f"<|placeholder{i}|>" for i in range(7, 40)]
ADDED_TOKENS = [
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    *[(f"<|placeholder{i}|>", True) for i in range(1, 5)],
    ("<|system|>", False),
    ("<|end|>", False),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", False),
    *[(token, True) for token in _PLACEHOLDERS],
    ("<|image|>", True),
]

# Text the tiny BPE is trained on: the words of the prompts and answers of the recipes' synthetic tasks.
_CORPUS = [
    "What is written in the image? Answer briefly.",
    "What colour is the shape? What shape is drawn? How many shapes are there?",
    "Is this meme hateful? Answer yes or no. yes no",
    "Is the statement true for the two images? true false",
    "Classify the video into one of the following classes:",
    "red green blue yellow purple orange black white gray cyan magenta",
    "circle square triangle star cross ring diamond",
    "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9",
    "the a an of in on is are there left right image picture video shows contains",
    "cat dog sun moon tree car house boat fish bird",
]


OFFICIAL_FIRST_ADDED_ID = 32000  # <|endoftext|>; <|image|> is 32044


def build_tokenizer(vocab_size: int = 512, official_ids: bool = False) -> Tokenizer:
    """A small Llama-style BPE with byte fallback: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, bytes 3-258,
    learned pieces, then the Phi-3 added tokens (``official_ids``: at their official ids, 32000-32044, after
    unused filler pieces). Normalizer, decoder and BOS template mirror the official."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizer
    # Train on "▁word" pieces, as SentencePiece does; the final tokenizer has no pre-tokenizer, like the official.
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    alphabet = sorted(set(string.printable) - set(string.whitespace) | {"▁", "\n"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=["<unk>"], show_progress=False
    )
    learner.train_from_iterator(_CORPUS * 4, trainer)
    learned = json.loads(learner.to_str())["model"]

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    while official_ids and len(vocab) < OFFICIAL_FIRST_ADDED_ID:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)  # no merge makes these: never produced
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>")])
    tokenizer.add_tokens([AddedToken("</s>", rstrip=True, normalized=False, special=False)])
    tokenizer.add_special_tokens([AddedToken(t, rstrip=r, normalized=False, special=True) for t, r in ADDED_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def _tokenizer_config(family: Family) -> dict:
    """tokenizer_config.json with the family's keys (added_tokens_decoder is derived by transformers)."""
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>", "<|end|>"],
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "processor_class": "Phi3VProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if not family.tokenizer_names_processor:
        del config["processor_class"]
    return config


# LongRoPE factors per family: made up (the official lists are for 96-wide heads), but different, as theirs are.
TINY_ROPE_FACTORS = {
    PHI_3_5_VISION.name: lambda i: (1.0 + 0.25 * i, 2.0 + 8.0 * i),
    PHI_3_VISION_128K.name: lambda i: (1.0 + 0.1 * i, 1.5 + 4.0 * i),
}


def tiny_config(
    vocab_size: int,
    pad_token_id: int,
    crop_size: int,
    patch_size: int,
    family: Family = PHI_3_5_VISION,
    servable: bool = False,
) -> Phi3VConfig:
    """A Phi3VConfig of ``family`` with official keys and geometry rules, but a 2-layer decoder and 3-layer CLIP;
    ``servable``: the full CLIP ViT-L/14-336 and 32-wide attention heads (what vLLM's CPU kernels take)."""
    head_dim = 32 if servable else 16
    factors = [TINY_ROPE_FACTORS[family.name](i) for i in range(head_dim // 2)]
    return Phi3VConfig(
        vocab_size=vocab_size,
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={
            "type": "su",
            "short_factor": [short for short, _ in factors],
            "long_factor": [long for _, long in factors],
        },
        rope_theta=10000.0,
        sliding_window=family.sliding_window,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        architectures=["Phi3VForCausalLM"],
        img_processor=None if servable else _tiny_clip(crop_size, patch_size),  # None: the official CLIP
    )


def _tiny_clip(crop_size: int, patch_size: int) -> dict:
    return {
        "image_dim_out": 64,
        "model_name": "tiny-clip",
        "name": "clip_vision_model",
        "num_img_tokens": (crop_size // patch_size // 2) ** 2,
        "clip_config": {
            # every Linear's input width is a multiple of 64, which 4-bit kernels on the CPU need
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": crop_size,
            "patch_size": patch_size,
        },
    }


def write_tiny_checkpoint(
    out: str | Path,
    crop_size: int = 336,
    patch_size: int = 14,
    num_crops: int | None = None,
    seed: int = 0,
    family: Family = PHI_3_5_VISION,
    servable: bool = False,
) -> Path:
    """Write the tiny checkpoint folder of ``family`` (``num_crops``: the processor's default, else the family's)
    and return its path. ``servable``: the shapes vLLM hard-codes (the full CLIP ViT-L/14-336 with 336-pixel
    crops, the official token ids, 32-wide attention heads), about 310 M parameters."""
    if servable and (crop_size, patch_size) != (336, 14):
        raise ValueError("A servable checkpoint has CLIP ViT-L/14-336's geometry: crop_size 336, patch_size 14.")
    if crop_size % (2 * patch_size):
        raise ValueError(f"crop_size ({crop_size}) must be a multiple of 2 * patch_size ({2 * patch_size}).")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(official_ids=servable)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(family), indent=2) + "\n")

    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64  # rows padded to a multiple of 64, as 32064
    config = tiny_config(vocab_size, tokenizer.token_to_id("<|endoftext|>"), crop_size, patch_size, family, servable)
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(config)
    model.save_pretrained(out)  # config.json, generation_config.json, model.safetensors
    written = {key: value for key, value in official_config(config, "float32").items() if key != "auto_map"}
    (out / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    if not family.has_generation_config:
        (out / "generation_config.json").unlink()

    processor_files = {
        "preprocessor_config.json": {
            "do_convert_rgb": True,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "image_processor_type": "Phi3VImageProcessor",
            "num_crops": num_crops if num_crops is not None else family.num_crops,
            "num_img_tokens": config.num_img_tokens,
            "crop_size": crop_size,
            "processor_class": "Phi3VProcessor",
        },
    }
    if family.has_processor_config:
        processor_files["processor_config.json"] = {"processor_class": "Phi3VProcessor"}
    for name, content in processor_files.items():
        content = family.official(name, content)
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return out
