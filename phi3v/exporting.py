"""A finished run written as a standalone model folder in the official layout of its family, Phi-3.5-vision or
Phi-3-vision-128k (``python -m phi3v.export``: what the folder holds and how it is checked)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import transformers
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from .data.conversation import Conversation, Turn
from .data.samples import encode_conversation
from .errors import RecipeError, no_space_left
from .hub import HUB_ID, require_folder
from .inference import Trained, load_trained, run_base_model
from .models.families import Family, family_of, official_config
from .models.processing import Phi3VProcessor
from .training.checkpoints import BEST_CHECKPOINT, best_checkpoint, checkpoint_folders, corruption, incompleteness
from .training.loading import load_model

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_SHARD_BYTES = 5 * 1024**3  # the official checkpoint's shards are 4.94 GB and 3.35 GB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
SMALL_FILES_BYTES = 256 * 1024  # configs, the shard index (50 kB for the official model), remote code (120 kB)
SPACE_ADVICE = (
    "Free space there, or pick an --out on another disk (an --overwrite replaces the old folder only once "
    "the new one is written)."
)
LEFTOVERS = re.compile(r"lora_|base_layer|modules_to_save|absmax|quant_map|quant_state|nested_")


def export(
    model_dir: str | Path,
    out: str | Path,
    base: str | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    checkpoint: str | None = None,
    num_crops: int | None = None,
) -> float:
    """Write the standalone folder (of the run's final model, or of ``checkpoint``: best, latest or a step),
    its processor config with ``num_crops`` (default: the run's); returns the largest logit difference between
    it and the run."""
    model_dir, out = Path(model_dir), Path(out).resolve()  # resolved: "." has no name to put a temporary folder beside
    require_folder(model_dir, "--model")
    weights = chosen_checkpoint(model_dir, checkpoint) if checkpoint is not None else None
    check_destination(out, [model_dir, Path(base or run_base_model(model_dir) or model_dir)], overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        difference = _export(model_dir, partial, out, base, dtype, weights, num_crops)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return difference


def chosen_checkpoint(model_dir: Path, choice: str) -> Path:
    """The complete checkpoint of the run that ``choice`` names: best (best_checkpoint.json), latest, or a step."""
    available = [step for step, folder in checkpoint_folders(model_dir) if incompleteness(folder) is None]
    steps = ", ".join(map(str, available)) or "none"
    if choice == "best":
        record = best_checkpoint(model_dir)
        if record is None:
            raise RecipeError(f"--checkpoint best: {model_dir} has no {BEST_CHECKPOINT} (the run did not use "
                              f"--save_best). Complete checkpoints: {steps}.")  # fmt: skip
        step = record["step"]
    elif choice == "latest":
        if not available:
            raise RecipeError(f"--checkpoint latest: {model_dir} holds no complete checkpoint.")
        step = available[-1]
    elif choice.isdigit():
        step = int(choice)
    else:
        raise RecipeError(f"--checkpoint {choice}: give best, latest or a step number (complete checkpoints: {steps}).")
    if step not in available:
        raise RecipeError(f"--checkpoint {choice}: {model_dir} has no complete checkpoint-{step} (complete "
                          f"checkpoints: {steps}).")  # fmt: skip
    problem = corruption(model_dir / f"checkpoint-{step}")
    if problem is not None:
        raise RecipeError(f"--checkpoint {choice}: {model_dir / f'checkpoint-{step}'}: {problem}.")
    if not (model_dir / "processor_config.json").is_file():
        raise RecipeError(f"{model_dir} holds no processor_config.json: the run's processor is needed beside its "
                          "checkpoints (runs save it when training starts).")  # fmt: skip
    return model_dir / f"checkpoint-{step}"


def check_destination(out: Path, protected: list[Path], overwrite: bool) -> None:
    """Refuse an --out that is, lies inside or holds one of ``protected`` (the run, its base), or that holds
    files, unless ``overwrite``."""
    target = out.resolve()
    for folder in (p.resolve() for p in protected if p.exists()):
        if target == folder or target.is_relative_to(folder) or folder.is_relative_to(target):
            raise RecipeError(f"--out {out} would overwrite {folder} (the run or its base model): pick a folder "
                              "outside both.")  # fmt: skip
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RecipeError(f"--out {out} already holds files: pick an empty or new folder, or pass --overwrite to "
                          "replace it.")  # fmt: skip


def _export(
    model_dir: Path,
    partial: Path,
    out: Path,
    base: str | None,
    dtype: str,
    weights_folder: Path | None,
    num_crops: int | None,
) -> float:
    """Export into ``partial``, then rename it to ``out`` (replacing what --overwrite allowed) and check it."""
    trained = load_trained(model_dir, base=base, device="cpu", weights=weights_folder, num_crops=num_crops)
    sample = _reference_sample(trained.processor)
    with torch.no_grad():
        expected = trained.model(**sample).logits
    model = trained.model.merge_and_unload() if trained.kind == "lora" else trained.model
    weights = {name: tensor.detach().to(DTYPES[dtype]).contiguous() for name, tensor in model.state_dict().items()}
    leftovers = [name for name in weights if LEFTOVERS.search(name)]
    if leftovers:
        raise RuntimeError(f"Merging left adapter or quantization tensors behind: {leftovers[:5]}")
    base = Path(trained.base) if trained.base and Path(trained.base).is_dir() else None  # a local base folder
    tokenizer_files = _tokenizer_files(base, model_dir)
    _require_space(weights, tokenizer_files, partial, out)
    try:
        _write_shards(weights, partial)
        (partial / "config.json").write_text(json.dumps(official_config(model.config, dtype), indent=2) + "\n")
        _write_generation_config(model, trained.processor, partial)
        _write_processor_files(trained, family_of(model.config), base, tokenizer_files, partial, out)
    except Exception as error:  # safetensors' own error type, or an OSError (a hub fetch failing is a warning)
        if no_space_left(error):
            raise RecipeError(f"The disk holding --out {out} filled up while the export was written ({error}); "
                              f"nothing was left behind. {SPACE_ADVICE}") from error  # fmt: skip
        raise
    if out.is_dir():
        shutil.rmtree(out)  # what --overwrite replaces (an empty folder otherwise)
    elif out.exists():
        out.unlink()
    partial.rename(out)
    exported = load_model(out, device="cpu", flag="--out").eval()
    with torch.no_grad():
        difference = (exported(**sample).logits - expected).abs().max().item()
    which = f" ({weights_folder.name})" if weights_folder is not None else ""
    print(f"Exported {trained.kind} run {model_dir}{which} to {out} ({dtype}, {len(weights)} tensors).")
    print(f"Largest logit difference from the run on an image-and-text sample: {difference:.3g}")
    return difference


def _require_space(weights: dict[str, torch.Tensor], tokenizer_files: list[Path], partial: Path, out: Path) -> None:
    """Refuse, before a byte is written, an export that does not fit on the disk that will hold --out (the folder
    it replaces is removed only once the new one is complete)."""
    needed = sum(tensor.nbytes for tensor in weights.values())
    needed += sum(file.stat().st_size for file in tokenizer_files) + SMALL_FILES_BYTES
    free = shutil.disk_usage(partial).free
    if free < needed:
        raise RecipeError(f"The export needs {_size(needed)} and the disk holding --out {out} has {_size(free)} "
                          f"free. {SPACE_ADVICE}")  # fmt: skip


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _write_shards(weights: dict[str, torch.Tensor], out: Path) -> None:
    """Shards of at most MAX_SHARD_BYTES, named and indexed as the official ones (an index even for one)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(tensor.nbytes for tensor in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_generation_config(model, processor, out: Path) -> None:
    """The official generation config, except that it stops at <|end|> and <|endoftext|> too: every answer the
    recipes train ends with them, and the official file's </s> alone lets a server run on past the answer."""
    config = model.config
    generation = {"_from_model_config": True, "bos_token_id": config.bos_token_id}
    generation["eos_token_id"] = processor.stop_token_ids
    generation |= {"pad_token_id": config.pad_token_id, "transformers_version": transformers.__version__}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _tokenizer_files(base: Path | None, model_dir: Path) -> list[Path]:
    """The tokenizer files the export copies: a local base folder's (the official ones), else the run's."""
    source = base if base is not None and (base / "tokenizer_config.json").is_file() else model_dir
    return [source / name for name in TOKENIZER_FILES if (source / name).is_file()]


def _write_processor_files(
    trained: Trained, family: Family, base: Path | None, tokenizer_files: list[Path], out: Path, final: Path
) -> None:
    """The tokenizer files; processor configs in the format of the model's family with the run's num_crops; the
    family's remote code."""
    for file in tokenizer_files:
        shutil.copyfile(file, out / file.name)
    image_processor = trained.processor.image_processor
    preprocessor = {
        "auto_map": family.processor_auto_map(),
        "do_convert_rgb": image_processor.do_convert_rgb,
        "image_mean": image_processor.image_mean,
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": image_processor.image_std,
        "num_crops": image_processor.num_crops,
        "num_img_tokens": image_processor.num_img_tokens,
        "processor_class": "Phi3VProcessor",
    }
    if image_processor.crop_size != 336:  # only small test checkpoints differ from the official geometry
        preprocessor["crop_size"] = image_processor.crop_size
    preprocessor = family.official("preprocessor_config.json", preprocessor)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    if family.has_processor_config:
        processor = {"auto_map": {"AutoProcessor": family.processor_auto_map()["AutoProcessor"]},
                     "processor_class": "Phi3VProcessor"}  # fmt: skip
        (out / "processor_config.json").write_text(json.dumps(processor) + "\n")
    _write_remote_code(family, trained.base, base, out, final)


def _write_remote_code(family: Family, named_base: str | None, base: Path | None, out: Path, final: Path) -> None:
    """The family's official remote-code files, which vLLM runs (``--trust-remote-code``): from a local base
    folder, or from the hub repository a hub-based run started from. Without them the export is still written, and
    the message says which files to copy from where."""
    remote_code = family.remote_code
    missing, repository = list(remote_code), family.hub_id
    if base is not None:
        for code in sorted(base.glob("*_phi3_v.py")):
            shutil.copyfile(code, out / code.name)
        missing = [name for name in remote_code if not (base / name).is_file()]
        reason = f"the base model folder {base} does not hold them"
    elif named_base is not None and HUB_ID.match(named_base):
        repository = named_base
        try:
            for name in remote_code:
                shutil.copyfile(hf_hub_download(named_base, name), out / name)
            return
        except (OSError, ValueError, EntryNotFoundError) as error:  # offline, unreachable, not in that repository
            reason = f"they could not be fetched from {named_base} ({type(error).__name__})"
    else:
        reason = "the run names no base model"
    if missing:
        logger.warning(
            "The export lacks remote-code files: %s. vLLM and trust_remote_code need them; copy %s from "
            "https://huggingface.co/%s/tree/main into %s.",
            reason, ", ".join(missing), repository, final,
        )  # fmt: skip


def _reference_sample(processor: Phi3VProcessor) -> dict[str, torch.Tensor]:
    """An image with shapes and a question about it, encoded as the recipes encode prompts."""
    image = Image.new("RGB", (400, 300), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 200, 200), fill=(200, 30, 30))
    draw.rectangle((230, 90, 360, 260), fill=(30, 60, 200))
    example = encode_conversation(processor, Conversation([Turn("What shapes are drawn?", "", [image])]), False)
    return {
        "input_ids": example["input_ids"][None],
        "pixel_values": example["pixel_values"],
        "image_sizes": example["image_sizes"],
    }
