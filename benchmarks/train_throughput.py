"""Training and evaluation throughput on DocVQA-shaped samples, in the format of the original's speed table.

    .venv/bin/python benchmarks/train_throughput.py --size tiny --mode all          # CPU, minutes
    .venv/bin/python benchmarks/train_throughput.py --size tiny --compare           # reference vs optimised
    python3 benchmarks/train_throughput.py --size full --mode lora --bf16           # a GPU

Workload: document-like pages and photos made on the fly with a fixed seed (mostly letter-sized portrait
scans, some A4 scans, landscape pages and 4:3 photos), num_crops 16, a question and a short answer, encoded
by the project's processor and prompt builder, so the token counts are the real ones (about 2,400 a sample,
nearly all image tokens). Samples are encoded once before timing: the figures are the model's training
steps (forward, backward, optimizer), which the dataloader workers overlap in a real run.

--size full is the real 4.15B architecture (CLIP ViT-L/14-336 + Phi-3-mini) with random weights, for a GPU.
--size tiny keeps the real crop geometry and token counts but shrinks widths and depths so a step takes
seconds on a CPU, with the vision tower's share of the compute close to the full model's (both are printed).
Text uses the tiny checkpoint's tokenizer at both sizes (a few dozen of the ~2,400 tokens).

Model FLOPs per sample count, for every weight matrix of N weights seeing T tokens: forward 2NT, the input
gradient 2NT wherever the gradient must flow, the weight gradient 2NT only for trained weights (the LM head
sees only the positions that predict a label: the loss needs no other logits); attention
adds 4T^2 * width per layer forward (no causal discount) and twice that backward where the gradient flows.
Recomputation by activation checkpointing is not counted. MFU = model FLOPs / time / the card's dense
bf16 peak (--peak_tflops to override).

--compare runs, in one process and on the same samples, the original recipe's behaviour (the reference
path, emulated here: eager attention, every crop slot including the zero padding through all CLIP layers
with every hidden state kept, logits at every position, micro-batch 1 with gradient accumulation) and the
project's path (SDPA or flash attention, real crops only, CLIP stopped at layer -2, the LM head only where
a label is predicted, --batch_size_per_gpu micro-batches grouped by length), checks that their losses
agree, prints each optimisation alone, and ends with `speedup: X.XX`. With --use_liger_kernel (a CUDA GPU)
the optimised path also runs Liger's RMSNorm and SwiGLU kernels, and the table gains their row.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import random
import resource
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.documents import scanned_page  # noqa: E402
from phi3v import Phi3VConfig, Phi3VForCausalLM  # noqa: E402
from phi3v.args import RecipeArguments  # noqa: E402
from phi3v.data.collators import EvalCollator, TrainCollator  # noqa: E402
from phi3v.data.conversation import Conversation, Turn  # noqa: E402
from phi3v.data.samples import encode_conversation  # noqa: E402
from phi3v.data.sampling import batched, length_grouped_order, padding_share  # noqa: E402
from phi3v.models.liger import check_liger_available  # noqa: E402
from phi3v.models.processing import IGNORE_INDEX  # noqa: E402
from phi3v.models.tiny import tiny_config, write_tiny_checkpoint  # noqa: E402
from phi3v.training.loading import load_model  # noqa: E402
from phi3v.training.preparation import base_model, prepare_for_training  # noqa: E402

MODES = ("full", "frozen_vision", "lora", "qlora")
# Dense bf16 peak of common cards, TFLOP/s (the vendors' figures without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
# The original's speed table: 8xA100, DocVQA at num_crops 16 (images/s over the node).
ORIGINAL = {"full": 8.66, "frozen_vision": 31.7, "lora": 12.1, "qlora": 10.5}
QUESTIONS = [
    ("What is the date on the letter?", "March 3, 1998"),
    ("Who is the memo addressed to?", "Dr. R. J. Smith"),
    ("What is the total amount?", "$1,254.00"),
    ("What is the title of the report?", "Annual Research Review"),
    ("Which company sent the invoice?", "Lorillard Tobacco Company"),
]
TINY_WIDTHS = {"hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 2}
TINY_CLIP = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2}


# --- workload ---------------------------------------------------------------------------------------------------


def page_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) of a DocVQA-like image: letter scans mostly, some A4, landscape pages and photos."""
    kind = rng.random()
    if kind < 0.78:  # US letter scans, 8.5 x 11 at 150-200 dpi
        width = rng.randint(1275, 1700)
        return width, round(width * 11 / 8.5 * rng.uniform(0.98, 1.02))
    if kind < 0.86:  # A4 scans
        width = rng.randint(1240, 1654)
        return width, round(width * 1.414)
    if kind < 0.94:  # landscape pages (slides, tables)
        height = rng.randint(1275, 1700)
        return round(height * 11 / 8.5), height
    return (1600, 1200) if rng.random() < 0.5 else (1200, 1600)  # 4:3 photos of documents


@dataclass
class Workload:
    train: list[dict]  # encoded training examples
    prompts: list[dict]  # the same samples as evaluation prompts
    lengths: list[int] = field(default_factory=list)


def make_workload(processor, count: int, seed: int) -> Workload:
    rng = random.Random(seed)
    workload = Workload([], [])
    for index in range(count):
        image = scanned_page(*page_size(rng), rng).convert("RGB")
        question, answer = rng.choice(QUESTIONS)
        conversation = Conversation([Turn(question, answer, [image])])
        example = encode_conversation(processor, conversation, for_training=True)
        prompt = encode_conversation(processor, conversation, for_training=False)
        workload.train.append(example)
        workload.prompts.append({**prompt, "index": index, "answers": [answer]})
        workload.lengths.append(len(example["input_ids"]))
    return workload


def grouped_padding(processor, batch_size: int, samples: int = 2000, seed: int = 1) -> tuple[float, float]:
    """Pad share of micro-batches of ``batch_size`` in random order and in --group_by_length's order, for
    ``samples`` lengths of the workload's distribution (token counts from image sizes; text ~ constant)."""
    rng = random.Random(seed)
    lengths = [processor.image_processor.num_tokens_for_size(*page_size(rng)) + 40 for _ in range(samples)]

    grouped = length_grouped_order(lengths, batch_size, seed)
    return tuple(padding_share(batched(lengths, order, batch_size)) for order in (range(samples), grouped))


# --- model FLOPs ------------------------------------------------------------------------------------------------


def training_flops(
    config: Phi3VConfig, crops: int, image_tokens: int, tokens: int, mode: str, supervised: int
) -> dict[str, float]:
    """Model FLOPs of one training sample in ``mode``, as {"vision": CLIP + projector, "language": decoder +
    lm_head}. The LM head counts only at the ``supervised`` positions, the ones the loss needs. LoRA adapters'
    own FLOPs (under 1% at rank 64) are left out."""
    clip = config.clip_vision_config()
    used = config.vision_feature_layer % (clip.num_hidden_layers + 1)  # CLIP layers that run (23 of 24)
    patches = (clip.image_size // clip.patch_size) ** 2
    width, hidden = clip.hidden_size, config.hidden_size
    kv_width = hidden // config.num_attention_heads * config.num_key_value_heads
    trains_vision = mode == "full"
    vision_grad = mode != "frozen_vision"  # LoRA adapts CLIP and the projector too
    trains_language = mode in ("full", "frozen_vision")

    def matmul(weights: int, seen: int, grad: bool, trained: bool) -> float:
        return 2.0 * weights * seen * (1 + grad + trained)

    def attention(length: int, attention_width: int, layers: int, grad: bool) -> float:
        return layers * 4.0 * length * length * attention_width * (1 + 2 * grad)

    clip_layer = 4 * width * width + 2 * width * clip.intermediate_size
    per_crop = (
        matmul(3 * clip.patch_size**2 * width, patches, False, trains_vision)  # no gradient into the pixels
        + matmul(used * clip_layer, patches + 1, vision_grad, trains_vision)
        + attention(patches + 1, width, used, vision_grad)
    )
    projector = matmul(4 * width * hidden + hidden * hidden, image_tokens, vision_grad, trains_vision)
    decoder_layer = hidden * (hidden + 2 * kv_width) + hidden * hidden + 3 * hidden * config.intermediate_size
    language = matmul(config.num_hidden_layers * decoder_layer, tokens, True, trains_language)
    language += matmul(hidden * config.vocab_size, supervised, True, trains_language)
    language += attention(tokens, hidden, config.num_hidden_layers, True)
    return {"vision": crops * per_crop + projector, "language": language}


def supervised_positions(example: dict) -> int:
    """The positions that predict a label (the loss's token count, as the Trainer counts it)."""
    return int((example["labels"][1:] != IGNORE_INDEX).sum())


def example_flops(config: Phi3VConfig, example: dict, mode: str) -> dict[str, float]:
    crop = config.clip_vision_config().image_size
    crops = sum(1 + (h // crop) * (w // crop) for h, w in example["image_sizes"].tolist())
    image_tokens = int((example["input_ids"] < 0).sum())
    return training_flops(config, crops, image_tokens, len(example["input_ids"]), mode, supervised_positions(example))


# --- the model ---------------------------------------------------------------------------------------------------


def model_config(size: str, vocab_size: int, pad_token_id: int) -> Phi3VConfig:
    if size == "full":
        return Phi3VConfig(pad_token_id=pad_token_id)  # the official architecture, 4,146,621,440 parameters
    config = tiny_config(vocab_size, pad_token_id, crop_size=336, patch_size=14)
    for name, value in TINY_WIDTHS.items():
        setattr(config, name, value)
    # heads of 64 as the full model's (4 of them), plain RoPE (tiny's LongRoPE factors are for heads of 16)
    config.num_attention_heads = config.num_key_value_heads = config.hidden_size // 64
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    config.img_processor["clip_config"].update(TINY_CLIP)
    config.img_processor["image_dim_out"] = TINY_CLIP["hidden_size"]
    return config


@dataclass
class Setup:
    """One configuration of the benchmark: what the reference path does differently is switched off here."""

    name: str
    attention: str = "sdpa"  # eager in the reference
    skip_padding: bool = True  # run only the real crops through CLIP
    stop_at_feature_layer: bool = True  # stop CLIP at layer -2, keep no hidden states
    micro_batch: int = 1  # the recipes' default; 1 with gradient accumulation in the reference
    group_by_length: bool = True
    fused_adamw: bool = True  # on CUDA
    pixels_in_training_dtype: bool = True  # on CUDA; the original handed over fp32
    supervised_logits_only: bool = True  # the LM head only where a label is predicted (the model's training forward)
    liger_kernel: bool = False  # --use_liger_kernel (CUDA only; never in the reference)


def reference_setup(name: str = "reference (the original)") -> Setup:
    return Setup(name, "eager", False, False, 1, False, False, False, False)


def build_model(config: Phi3VConfig, mode: str, setup: Setup, args, folder: Path) -> torch.nn.Module:
    """Random weights (seed 0) through the recipes' own loading and mode preparation (freezing, LoRA)."""
    recipe_args = RecipeArguments(
        model_name_or_path=str(folder),
        use_lora=mode in ("lora", "qlora"),
        use_qlora=mode == "qlora",
        freeze_vision_model=mode == "frozen_vision",
        use_flash_attention=args.use_flash_attention,
        bf16=args.bf16,
        deepspeed="none",
        gradient_checkpointing=args.gradient_checkpointing,
        use_liger_kernel=setup.liger_kernel,
        # rank 64 on the full model's 3,072-wide layers; the same share of the tiny model's width
        lora_rank=args.lora_rank or round(64 * config.hidden_size / 3072),
    )
    attention = "flash_attention_2" if args.use_flash_attention and setup.attention != "eager" else setup.attention
    dtype = torch.bfloat16 if args.use_flash_attention else torch.float32
    if mode == "qlora":  # 4-bit layers are made by from_pretrained, so the weights go through a file
        if not (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists():
            torch.manual_seed(0)
            Phi3VForCausalLM(config).save_pretrained(folder)
        model = load_model(folder, dtype, attention, quantize_4bit=True, device=args.device)
        model.model.vision_embed_tokens.img_processor.vision_model.set_attn_implementation(attention)
    else:
        torch.manual_seed(0)
        model = load_model(config, dtype, attention, device=args.device)
    torch.manual_seed(0)  # LoRA's initialisation
    model = prepare_for_training(model, recipe_args)
    if not (setup.skip_padding and setup.stop_at_feature_layer):
        embedding = base_model(model).model.vision_embed_tokens
        embedding.forward = types.MethodType(
            lambda self, pixels, sizes: reference_image_features(self, pixels, sizes, setup), embedding
        )
    return model.train()


def reference_image_features(embedding, pixel_values: torch.Tensor, image_sizes: torch.Tensor, setup: Setup):
    """Phi3VImageEmbedding.forward as the original computes it: all max_crops+1 slots of every image, the
    zero padding included, through every CLIP layer with every hidden state kept, the features taken from
    hidden_states[-2]; or with one of the two switched back to the project's way. Same values either way."""
    grids = embedding._crop_grids(pixel_values, image_sizes)
    crops_per_image = [1 + rows * cols for rows, cols in grids]
    if setup.skip_padding:
        crops = torch.cat([image[:n] for image, n in zip(pixel_values, crops_per_image)])
    else:
        crops = pixel_values.flatten(0, 1)
    tower = embedding.img_processor
    crops = crops.to(tower.vision_model.embeddings.patch_embedding.weight.dtype)
    if setup.stop_at_feature_layer:
        features = tower(crops)
    else:
        outputs = tower.vision_model(pixel_values=crops, output_hidden_states=True)
        features = outputs.hidden_states[-2][:, 1:]
    if not setup.skip_padding:
        slots = features.unflatten(0, (len(pixel_values), pixel_values.shape[1]))
        features = torch.cat([image[:n] for image, n in zip(slots, crops_per_image)])
    merged = embedding._merge_2x2(features)
    tokens = [
        embedding._hd_layout(image_crops, rows, cols)
        for image_crops, (rows, cols) in zip(merged.split(crops_per_image), grids)
    ]
    return embedding.img_projection(torch.cat(tokens).to(embedding.glb_GN.dtype))


# --- timing ----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    setup: str
    mode: str
    losses: list[float]
    seconds: float  # timed steps only
    samples: int
    tokens: int
    padded_tokens: int
    peak_memory_gib: float
    flops: float  # model FLOPs of the timed samples

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds


def step_batches(examples: list[dict], lengths: list[int], setup: Setup, collator) -> list[dict]:
    """One optimizer step's micro-batches; grouping reorders the step's own samples only, so every setup
    trains on the same samples in every step and the losses can be compared."""
    order = list(range(len(examples)))
    if setup.group_by_length and setup.micro_batch > 1:
        order = length_grouped_order([lengths[i] for i in order], setup.micro_batch, seed=0)
    return [
        collator([examples[i] for i in order[start : start + setup.micro_batch]])
        for start in range(0, len(order), setup.micro_batch)
    ]


def training_loss(model: torch.nn.Module, batch: dict, num_items_in_batch: int, setup: Setup) -> torch.Tensor:
    """The micro-batch's share of the step's loss (token sum over the step's supervised tokens)."""
    if setup.supervised_logits_only:
        return model(**batch, num_items_in_batch=num_items_in_batch, use_cache=False).loss
    labels = batch.pop("labels")  # as the original: logits at every position, then the loss
    logits = model(**batch, use_cache=False).logits
    return model.loss_function(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


def reset_peak_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) on Linux


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_setup(setup: Setup, mode: str, config: Phi3VConfig, workload: Workload, args, folder: Path) -> Result:
    device = args.device
    reset_peak_memory(device)
    model = build_model(config, mode, setup, args, folder)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = setup.fused_adamw and device.startswith("cuda")
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.01, fused=fused)
    autocast_dtype = torch.bfloat16 if args.bf16 else torch.float16
    use_autocast = device.startswith("cuda") and not args.use_flash_attention
    on_gpu = device.startswith("cuda")
    pixel_dtype = autocast_dtype if on_gpu and setup.pixels_in_training_dtype else torch.float32
    collator = TrainCollator(args.pad_token_id, pixel_dtype=pixel_dtype)
    losses, seconds, samples, tokens, padded, flops = [], 0.0, 0, 0, 0, 0.0
    for step in range(args.warmup_steps + args.steps):
        examples = workload.train[step * args.batch_size : (step + 1) * args.batch_size]
        lengths = workload.lengths[step * args.batch_size : (step + 1) * args.batch_size]
        batches = step_batches(examples, lengths, setup, collator)
        supervised = sum(supervised_positions(e) for e in examples)
        started = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with torch.autocast(device.split(":")[0], dtype=autocast_dtype, enabled=use_autocast):
                loss = training_loss(model, batch, supervised, setup)
            loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(step_loss))  # the one host synchronisation of the step
        if step >= args.warmup_steps:
            seconds += time.perf_counter() - started
            samples += len(examples)
            tokens += sum(lengths)
            padded += sum(b["input_ids"].numel() for b in batches)
            flops += sum(sum(example_flops(config, e, mode).values()) for e in examples)
    result = Result(setup.name, mode, losses, seconds, samples, tokens, padded, peak_memory_gib(device), flops)
    del model, optimizer, trainable
    return result


def profile_step(config: Phi3VConfig, workload: Workload, args, folder: Path) -> None:
    """The operators that take the time in one optimised training step of the first --mode."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    args.steps, args.warmup_steps = 1, 0
    setup = Setup("optimised", micro_batch=args.batch_size_per_gpu, liger_kernel=args.use_liger_kernel)
    with profile(activities=activities) as profiler:
        run_setup(setup, args.mode[0], config, workload, args, folder)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=key, row_limit=25))


def precision_check(config: Phi3VConfig, processor, args) -> None:
    """The loss of one short sample in fp32 and in bf16 (autocast, as --bf16 trains; bf16 weights with
    --use_flash_attention): finite, and within 1% of each other. With random weights the loss sits near
    ln(vocab), so this catches a bf16 path that overflows or computes something else, not fine drift."""
    torch.manual_seed(0)
    model = load_model(config, device=args.device)
    image = scanned_page(400, 300, random.Random(0)).convert("RGB")
    example = encode_conversation(processor, Conversation([Turn(*QUESTIONS[0], [image])]), for_training=True)
    batch = {k: v.to(args.device) for k, v in TrainCollator(args.pad_token_id)([example]).items()}
    device_type = args.device.split(":")[0]
    with torch.no_grad():
        reference = float(model(**batch).loss)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            mixed = float(model(**batch).loss)
        half = None
        if args.use_flash_attention:
            model = model.to(torch.bfloat16)
            model.set_attn_implementation("flash_attention_2")
            half = float(model(**batch).loss)
    figures = [("bf16 autocast", mixed)] + ([("bf16 weights + flash attention", half)] if half is not None else [])
    print(f"\nPrecision check ({len(example['input_ids'])} tokens): fp32 loss {reference:.5f}")
    for name, loss in figures:
        difference = abs(loss - reference) / abs(reference)
        verdict = "ok" if math.isfinite(loss) and difference < 0.01 else "FAILED"
        print(f"  {name}: loss {loss:.5f}, relative difference {difference:.2e}: {verdict}")
        if verdict != "ok":
            raise SystemExit(f"The {name} loss is not finite or not within 1% of the fp32 loss.")
    del model


# --- evaluation -----------------------------------------------------------------------------------------------


def generation_rate(config: Phi3VConfig, workload: Workload, args, batch_size: int, folder: Path) -> float:
    """Greedy answers per second for the workload's prompts, ``args.max_new_tokens`` tokens each."""
    model = build_model(config, "full", Setup("eval"), args, folder).eval()
    collator = EvalCollator(args.pad_token_id)
    prompts = workload.prompts[: args.eval_samples]
    device_type, dtype = args.device.split(":")[0], torch.bfloat16 if args.bf16 else torch.float16

    def answer(batch_prompts: list[dict]) -> None:
        batch = collator(batch_prompts)
        inputs = {k: v.to(args.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode(), torch.autocast(device_type, dtype, enabled=device_type != "cpu"):
            model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False
            )

    answer(prompts[:batch_size])  # warm-up, untimed: first-call costs belong to neither batch size
    if device_type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        answer(prompts[start : start + batch_size])
    if device_type == "cuda":
        torch.cuda.synchronize()
    return len(prompts) / (time.perf_counter() - started)


# --- reports ---------------------------------------------------------------------------------------------------


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for card, peak in PEAK_TFLOPS.items() if card in name), None)


def print_table(results: list[Result], args) -> None:
    peak = peak_tflops(args)
    print(
        f"\n{'mode':<14} {'setup':<34} {'images/s':>9} {'tokens/s':>10} {'pad':>6} {'peak mem':>10} "
        f"{'FLOP/image':>10} {'MFU':>6}"
    )
    for r in results:
        mfu = f"{r.flops / r.seconds / (peak * 1e12):6.1%}" if peak else "     -"
        memory = f"{r.peak_memory_gib:.2f} GiB"
        pad = 1 - r.tokens / r.padded_tokens
        print(
            f"{r.mode:<14} {r.setup:<34} {r.images_per_s:9.3f} {r.tokens / r.seconds:10.0f} {pad:6.1%} "
            f"{memory:>10} {r.flops / r.samples:10.3g} {mfu}"
        )
    where = "GPU memory (max allocated)" if args.device.startswith("cuda") else "the process's peak RSS"
    print(f"peak mem: {where}; MFU against {peak or '-'} TFLOP/s dense bf16" + ("" if peak else " (no GPU)"))


def describe(config: Phi3VConfig, workload: Workload, processor, args, size: str) -> None:
    lengths = workload.lengths
    image_tokens = [int((e["input_ids"] < 0).sum()) for e in workload.train]
    print(
        f"Workload: {len(lengths)} DocVQA-shaped samples at num_crops {args.num_crops}: "
        f"{statistics.mean(lengths):,.0f} "
        f"tokens per sample on average ({statistics.mean(image_tokens):,.0f} of them image tokens), "
        f"{min(lengths):,} to {max(lengths):,}"
    )
    full = model_config("full", config.vocab_size, args.pad_token_id)
    for mode in ("full", "frozen_vision", "lora"):
        shares = []
        for name, cfg in ((size, config), ("full size", full)):
            totals = [example_flops(cfg, e, mode) for e in workload.train]
            vision = sum(t["vision"] for t in totals) / sum(sum(t.values()) for t in totals)
            shares.append(f"{name} {vision:.0%} vision / {1 - vision:.0%} language")
        print(f"Compute split, {mode}: " + ", ".join(shares))
    flops = statistics.mean(sum(example_flops(config, e, "full").values()) for e in workload.train)
    print(f"Model FLOPs per training sample (full finetuning, {size}): {flops:.3g}")
    micro_batch = max(args.batch_size_per_gpu, 4)
    random_pad, grouped_pad = grouped_padding(processor, micro_batch)
    print(
        f"Pad tokens at micro-batch {micro_batch} over 2,000 samples of this mix: "
        f"{random_pad:.1%} in random order, {grouped_pad:.1%} with --group_by_length"
    )


def compare(config: Phi3VConfig, workload: Workload, args, folder: Path) -> float:
    """The ablation table; returns the optimised path's speedup over the reference."""
    mode = args.mode[0]
    optimised = Setup(
        "optimised (all of the above)", micro_batch=args.batch_size_per_gpu, liger_kernel=args.use_liger_kernel
    )
    reference = reference_setup()
    ablations = [
        replace(reference, name="+ SDPA attention", attention="sdpa"),
        replace(reference, name="+ real crops only", skip_padding=True),
        replace(reference, name="+ CLIP stops at layer -2", stop_at_feature_layer=True),
        replace(reference, name="+ LM head at labels only", supervised_logits_only=True),
    ]
    if args.batch_size_per_gpu > 1:
        name = f"+ micro-batch {args.batch_size_per_gpu}, grouped"
        ablations.append(replace(reference, name=name, micro_batch=args.batch_size_per_gpu, group_by_length=True))
    if args.use_liger_kernel:
        ablations.append(replace(reference, name="+ Liger kernels", liger_kernel=True))
    results = [run_setup(s, mode, config, workload, args, folder) for s in (reference, *ablations, optimised)]
    print_table(results, args)
    tolerance = 1e-3 if not args.device.startswith("cuda") else 3e-2
    for result in results[1:]:
        worst = max(abs(a - b) / abs(b) for a, b in zip(result.losses, results[0].losses))
        status = "agree" if worst <= tolerance else "DIFFER"
        print(f"losses of {result.setup!r}: {status} with the reference (largest relative difference {worst:.1e})")
        if worst > tolerance:
            raise SystemExit(f"The losses differ by more than {tolerance}: the paths do not compute the same thing.")
    return results[-1].images_per_s / results[0].images_per_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--mode", default="lora", help="full, frozen_vision, lora, qlora, all, or a comma list")
    parser.add_argument("--compare", action="store_true", help="reference vs optimised path on the first --mode")
    parser.add_argument("--eval", action="store_true", help="also time generation: batch 1 against batched")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one optimised step")
    parser.add_argument("--precision_check", action="store_true", help="bf16 loss against fp32 on a short sample")
    parser.add_argument("--batch_size", type=int, default=4, help="samples per optimizer step")
    parser.add_argument(
        "--batch_size_per_gpu", type=int, default=1, help="micro-batch of the optimised path (the recipes' default: 1)"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    parser.add_argument("--warmup_steps", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--num_crops", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU), as the scripts' flag")
    parser.add_argument("--use_flash_attention", action="store_true", help="bf16 weights + flash attention")
    parser.add_argument("--gradient_checkpointing", choices=["true", "decoder", "false"], default="true")
    parser.add_argument("--use_liger_kernel", action="store_true", help="Liger's kernels in the optimised path (CUDA)")
    parser.add_argument("--lora_rank", type=int, default=None, help="default: 64 at full size, 5 at tiny (same share)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="tokens per answer in --eval")
    parser.add_argument("--eval_samples", type=int, default=8, help="prompts --eval answers")
    parser.add_argument("--eval_batch_size", type=int, default=4, help="the batched side of --eval")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.mode = list(MODES) if args.mode == "all" else args.mode.split(",")
    if unknown := set(args.mode) - set(MODES):
        parser.error(f"--mode: unknown {sorted(unknown)}; choose from {', '.join(MODES)} or all")
    if args.use_flash_attention:
        args.bf16 = True
    if args.use_liger_kernel:
        try:
            check_liger_available()
        except ValueError as error:
            parser.error(str(error))
    if args.batch_size % args.batch_size_per_gpu:
        parser.error("--batch_size must be a multiple of --batch_size_per_gpu")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_tiny_checkpoint(Path(scratch) / "processor", num_crops=args.num_crops)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder, num_crops=args.num_crops)
        args.pad_token_id = processor.tokenizer.pad_token_id
        vocab = processor.tokenizer.vocab_size if args.size == "tiny" else 32064
        config = model_config(args.size, -(-max(vocab, len(processor.tokenizer)) // 64) * 64, args.pad_token_id)
        count = (args.warmup_steps + args.steps) * args.batch_size
        workload = make_workload(processor, max(count, args.eval_samples if args.eval else 0), args.seed)
        describe(config, workload, processor, args, args.size)
        if args.precision_check:
            precision_check(config, processor, args)
        device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
        print(
            f"Device: {device_name}; {args.size} model; batch {args.batch_size} per step; "
            f"{args.steps} timed steps after {args.warmup_steps} warm-up; gradient checkpointing "
            f"{args.gradient_checkpointing}; {'bf16' if args.bf16 else 'fp16' if args.device != 'cpu' else 'fp32'}"
        )
        weights = Path(scratch) / "weights"
        if args.profile:
            profile_step(config, workload, args, weights)
        elif args.compare:
            speedup = compare(config, workload, args, weights)
        else:
            setup = Setup("optimised", micro_batch=args.batch_size_per_gpu, liger_kernel=args.use_liger_kernel)
            print_table([run_setup(setup, mode, config, workload, args, weights) for mode in args.mode], args)
        if args.eval:
            one = generation_rate(config, workload, args, 1, weights)
            batched = generation_rate(config, workload, args, args.eval_batch_size, weights)
            print(
                f"\nEvaluation (generation, {args.max_new_tokens} new tokens): batch 1 (the original) "
                f"{one:.2f} samples/s, batch {args.eval_batch_size} left-padded {batched:.2f} samples/s "
                f"({batched / one:.2f}x)"
            )
        if args.compare and not args.profile:
            print(f"speedup: {speedup:.2f}")  # the last line, for scripts


if __name__ == "__main__":
    main()
