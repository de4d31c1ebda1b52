"""Phi3VForCausalLM: official layout, image-feature math and placement, batching, generation, saving."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from phi3v import Phi3VConfig, Phi3VForCausalLM
from phi3v.data.conversation import Conversation, Turn
from tests.conftest import noise_image, reference_file, require_reference, training_batch


def chat(processor, question: str, n_images: int) -> str:
    tags = "".join(f"<|image_{k}|>" for k in range(1, n_images + 1))
    return processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{tags}\n{question}"}], tokenize=False, add_generation_prompt=True
    )


# --- the official checkpoint's structure -------------------------------------------------------------


def test_official_config_gives_the_official_layout(official_dir):
    layout = json.loads(require_reference(reference_file("phi35v_checkpoint_layout.json")).read_text())
    config = AutoConfig.from_pretrained(official_dir)
    assert isinstance(config, Phi3VConfig)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, Phi3VForCausalLM)
    state = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert state == layout["parameters"]
    assert sum(p.numel() for p in model.parameters()) == layout["total_parameters"] == 4_146_621_440
    assert all(p.device.type == "meta" for p in model.parameters())


def test_official_longrope(official_dir):
    """LongRoPE as the official modeling_phi3_v.py computes it:
    inv_freq = 1 / (ext * 10000^(2i/96)), short factors up to 4096 tokens, long beyond,
    cos and sin scaled by sqrt(1 + ln(131072/4096) / ln(4096)) in both regimes."""
    config = AutoConfig.from_pretrained(official_dir)
    raw = json.loads((official_dir / "config.json").read_text())["rope_scaling"]
    rotary = Phi3RotaryEmbedding(config)
    scale = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    assert scale == pytest.approx(1.19024, abs=1e-5)
    x = torch.zeros(1, dtype=torch.float32)
    for length, factors in [(4096, raw["short_factor"]), (4097, raw["long_factor"])]:
        positions = torch.arange(length)[None]
        cos, sin = rotary(x, positions)
        inv_freq = 1.0 / (torch.tensor(factors) * 10000.0 ** (torch.arange(0, 96, 2).float() / 96))
        angles = positions[0, :, None].float() * inv_freq
        expected = torch.cat([angles, angles], -1)
        torch.testing.assert_close(cos[0], expected.cos() * scale)
        torch.testing.assert_close(sin[0], expected.sin() * scale)


def test_official_attn_implementation_request_is_not_forced(official_dir):
    # The hub config.json asks for flash_attention_2; loading must not depend on flash-attn being installed.
    assert json.loads((official_dir / "config.json").read_text())["_attn_implementation"] == "flash_attention_2"
    config = AutoConfig.from_pretrained(official_dir)
    assert config._attn_implementation in (None, "sdpa")


# --- image features ------------------------------------------------------------------------------------


def test_vision_tower_stops_at_layer_minus_2(tiny_model):
    tower = tiny_model.model.vision_embed_tokens.img_processor
    pixels = torch.randn(3, 3, 56, 56)
    reference = CLIPVisionModel(tower.vision_model.config)
    reference.load_state_dict(tower.vision_model.state_dict())
    hidden = reference(pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == tower.vision_model.config.num_hidden_layers + 1
    torch.testing.assert_close(tower(pixels), hidden[-2][:, 1:], rtol=0, atol=0)
    unused = {id(p) for p in tower.unused_parameters()}
    assert {id(p) for p in tower.vision_model.encoder.layers[-1].parameters()} <= unused
    assert {id(p) for p in tower.vision_model.post_layernorm.parameters()} <= unused


def reference_image_tokens(embedding, pixel_values, image_sizes):
    """The official HD feature layout by explicit loops:
    2x2 blocks (TL, TR, BL, BR) per crop, crops tiled row-major with
    sub_GN closing every token row, then glb_GN, then the global view's rows each closed by sub_GN."""
    size, g = embedding.crop_size, embedding.grid
    tokens = []
    for pixels, (height, width) in zip(pixel_values, image_sizes.tolist()):
        rows, cols = height // size, width // size
        patches = embedding.img_processor(pixels[: 1 + rows * cols])  # [crops, (2g)^2, C]
        grid = patches.reshape(len(patches), 2 * g, 2 * g, -1)

        def block(crop, i, j, grid=grid):
            p = grid[crop]
            return torch.cat([p[2 * i, 2 * j], p[2 * i, 2 * j + 1], p[2 * i + 1, 2 * j], p[2 * i + 1, 2 * j + 1]])

        for r in range(rows):
            for i in range(g):
                for c in range(cols):
                    tokens += [block(1 + r * cols + c, i, j) for j in range(g)]
                tokens.append(embedding.sub_GN.flatten())
        tokens.append(embedding.glb_GN.flatten())
        for i in range(g):
            tokens += [block(0, i, j) for j in range(g)]
            tokens.append(embedding.sub_GN.flatten())
    return embedding.img_projection(torch.stack(tokens))


def test_image_features_follow_the_official_layout(tiny_model, tiny_processor):
    embedding = tiny_model.model.vision_embed_tokens
    with torch.no_grad():  # non-zero separators, so a misplaced separator shows
        embedding.sub_GN.copy_(torch.randn_like(embedding.sub_GN))
        embedding.glb_GN.copy_(torch.randn_like(embedding.glb_GN))
    images = [noise_image(200, 90, 1), noise_image(70, 160, 2), noise_image(64, 64, 3)]
    out = tiny_processor.image_processor(images, num_crops=6)
    with torch.no_grad():
        features = embedding(out["pixel_values"], out["image_sizes"])
        expected = reference_image_tokens(embedding, out["pixel_values"], out["image_sizes"])
        embedding.sub_GN.zero_()
        embedding.glb_GN.zero_()
    assert features.shape[0] == sum(out["num_img_tokens"])
    torch.testing.assert_close(features, expected)


def test_features_land_exactly_at_the_placeholders(tiny_model, tiny_processor):
    prompt = chat(tiny_processor, "What colour is the shape?", 2)
    batch = tiny_processor(prompt, [noise_image(90, 60, 1), noise_image(40, 120, 2)])
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = tiny_model.model.embed_inputs(ids, batch["pixel_values"], batch["image_sizes"])
        features = tiny_model.model.vision_embed_tokens(batch["pixel_values"], batch["image_sizes"])
        text = tiny_model.model.embed_tokens(ids.clamp(min=0))
    is_image = ids < 0
    assert torch.equal(embeds[is_image], features)
    assert torch.equal(embeds[~is_image], text[~is_image])
    # image 1's features sit at the -1 ids, image 2's at the -2 ids
    n1 = int((ids == -1).sum())
    assert torch.equal(embeds[ids == -1], features[:n1]) and torch.equal(embeds[ids == -2], features[n1:])


def test_pixels_change_nothing_before_the_image_tokens(tiny_model, tiny_processor):
    prompt = chat(tiny_processor, "What colour is the shape?", 1)
    a = tiny_processor(prompt, [noise_image(90, 60, 1)])
    b = tiny_processor(prompt, [noise_image(90, 60, 2)])
    assert torch.equal(a["input_ids"], b["input_ids"])
    first_image = int((a["input_ids"][0] < 0).nonzero()[0])
    with torch.no_grad():
        logits_a, logits_b = tiny_model(**a).logits, tiny_model(**b).logits
    assert torch.equal(logits_a[0, :first_image], logits_b[0, :first_image])
    assert not torch.allclose(logits_a[0, first_image:], logits_b[0, first_image:])


def test_placeholder_count_mismatch_is_a_clear_error(tiny_model, tiny_processor):
    batch = tiny_processor(chat(tiny_processor, "hi", 1), [noise_image(90, 60)])
    ids = batch["input_ids"]
    ids = ids[ids != -1][None]  # no placeholders left, yet pixels given
    ids = torch.cat([ids, torch.tensor([[-1, -1]])], 1)  # too few placeholders
    with pytest.raises(ValueError, match="tokens: .* features"):
        tiny_model(input_ids=ids, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match="pixel_values"):
        tiny_model(input_ids=batch["input_ids"])


# --- batching and generation ------------------------------------------------------------------------------


def right_padded(samples, pad_id):
    width = max(s["input_ids"].shape[1] for s in samples)
    ids = torch.full((len(samples), width), pad_id)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = s["input_ids"].shape[1]
        ids[row, :n], mask[row, :n] = s["input_ids"][0], 1
    pixels = [s for s in samples if "pixel_values" in s]
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=torch.cat([s["pixel_values"] for s in pixels]),
        image_sizes=torch.cat([s["image_sizes"] for s in pixels]),
    )


def test_mixed_batch_equals_each_sample_alone(tiny_model, tiny_processor):
    samples = [
        tiny_processor(chat(tiny_processor, "Describe it.", 1), [noise_image(200, 60, 1)]),
        tiny_processor(
            chat(tiny_processor, "Are they the same shape?", 2), [noise_image(50, 50, 2), noise_image(90, 300, 3)]
        ),
        tiny_processor(chat(tiny_processor, "Which colour?", 1), [noise_image(120, 80, 4)]),
        tiny_processor(chat(tiny_processor, "No image here.", 0)),
    ]
    batch = right_padded(samples, tiny_processor.tokenizer.pad_token_id)
    with torch.no_grad():
        batched = tiny_model(**batch).logits
        for row, sample in enumerate(samples):
            alone = tiny_model(**sample).logits[0]
            torch.testing.assert_close(batched[row, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)


def generation_inputs(processor):
    texts = [chat(processor, "What colour is the shape?", 1), chat(processor, "Are these two the same?", 2)]
    images = [[noise_image(100, 60, 5)], [noise_image(60, 60, 6), noise_image(40, 150, 7)]]
    return texts, images


# Greedy, never stopping early, with the per-step scores to compare.
GREEDY = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_scores=True)


def test_cached_generation_equals_uncached(tiny_model, tiny_processor):
    texts, images = generation_inputs(tiny_processor)
    batch = tiny_processor(texts, images)
    with torch.no_grad():
        cached = tiny_model.generate(**batch, use_cache=True, **GREEDY)
        uncached = tiny_model.generate(**batch, use_cache=False, **GREEDY)
    assert cached.sequences.shape[1] == batch["input_ids"].shape[1] + 8
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-5)


def test_left_padding_gives_the_same_tokens_as_no_padding(tiny_model, tiny_processor):
    texts, images = generation_inputs(tiny_processor)
    batch = tiny_processor(texts, images)
    assert batch["attention_mask"][0].eq(0).any(), "the first sample must be padded for this test"
    with torch.no_grad():
        together = tiny_model.generate(**batch, **GREEDY)
        for row, (text, imgs) in enumerate(zip(texts, images)):
            single = tiny_processor(text, imgs)
            alone = tiny_model.generate(**single, **GREEDY)
            new_tokens = together.sequences[row, batch["input_ids"].shape[1] :]
            assert torch.equal(new_tokens, alone.sequences[0, single["input_ids"].shape[1] :])
            scores = torch.stack([step[row] for step in together.scores])
            torch.testing.assert_close(scores, torch.stack(alone.scores)[:, 0], rtol=1e-4, atol=1e-5)


# --- attention backends, checkpointing, training ---------------------------------------------------------------


def test_attention_backends_agree(tiny_dir, tiny_processor, caplog):
    batch = tiny_processor(chat(tiny_processor, "What colour is the shape?", 1), [noise_image(100, 70)])
    logits = {}
    for backend in ("eager", "sdpa"):
        model = Phi3VForCausalLM.from_pretrained(tiny_dir, attn_implementation=backend).eval()
        assert model.config._attn_implementation == backend
        assert model.model.vision_embed_tokens.img_processor.vision_model.config._attn_implementation == backend
        with torch.no_grad():
            logits[backend] = model(**batch).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-5)


def test_flash_attention_without_the_package_falls_back_to_sdpa(tiny_dir, caplog):
    pytest.importorskip("torch")
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with caplog.at_level(logging.WARNING, logger="phi3v.models.modeling"):
        model = Phi3VForCausalLM.from_pretrained(tiny_dir, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert "flash-attn package is not installed" in caplog.text


# The training batch of the gradient tests: one sample, one image, one answer.
RED_SHAPE = [Conversation([Turn("What colour is the shape?", "red", [noise_image(120, 90, 8)])])]


def grads_after_backward(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_forward_backward_reaches_every_trained_part(tiny_dir, tiny_processor):
    model = Phi3VForCausalLM.from_pretrained(tiny_dir).train()
    loss, grads = grads_after_backward(model, training_batch(tiny_processor, RED_SHAPE))
    assert torch.isfinite(loss)
    prefix = "model.vision_embed_tokens."
    for name in [
        prefix + "img_processor.vision_model.embeddings.patch_embedding.weight",
        prefix + "img_processor.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        prefix + "img_processor.vision_model.encoder.layers.1.mlp.fc2.weight",
        prefix + "img_projection.0.weight",
        prefix + "img_projection.2.weight",
        prefix + "sub_GN",
        prefix + "glb_GN",
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.layers.1.mlp.gate_up_proj.weight",
        "lm_head.weight",
    ]:
        assert name in grads and grads[name].abs().sum() > 0, name
    # The layer after -2 and post_layernorm never run, so they get no gradient.
    assert prefix + "img_processor.vision_model.encoder.layers.2.mlp.fc1.weight" not in grads
    assert prefix + "img_processor.vision_model.post_layernorm.weight" not in grads


def test_a_batch_without_images_still_reaches_the_vision_parameters(tiny_dir, tiny_processor):
    """DDP and DeepSpeed need every trainable parameter in every backward pass: a text-only batch gives the
    vision tower, projector and separators an exactly-zero gradient and leaves the loss unchanged."""
    prompt = chat(tiny_processor, "Say hello.", 0)
    batch = tiny_processor(prompt)
    answer = tiny_processor.tokenizer("hello<|end|>\n<|endoftext|>", add_special_tokens=False, return_tensors="pt")
    batch["input_ids"] = torch.cat([batch["input_ids"], answer.input_ids], 1)
    batch["labels"] = batch["input_ids"].clone()
    del batch["attention_mask"]
    model = Phi3VForCausalLM.from_pretrained(tiny_dir).train()
    loss, grads = grads_after_backward(model, batch)
    with torch.no_grad():
        assert torch.equal(loss, model.eval()(**batch).loss)  # the evaluation path runs no vision at all
    vision = {n: g for n, g in grads.items() if n.startswith("model.vision_embed_tokens.")}
    assert (
        "model.vision_embed_tokens.img_projection.2.weight" in vision and "model.vision_embed_tokens.sub_GN" in vision
    )
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight" in vision
    assert all(not g.any() for g in vision.values())
    assert grads["lm_head.weight"].abs().sum() > 0
    model.train().model.vision_embed_tokens.requires_grad_(False)  # frozen vision: nothing extra runs
    _, frozen = grads_after_backward(model, batch)
    assert not [n for n in frozen if n.startswith("model.vision_embed_tokens.")]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, tiny_processor):
    batch = training_batch(tiny_processor, RED_SHAPE)
    model = Phi3VForCausalLM.from_pretrained(tiny_dir).train()
    loss, grads = grads_after_backward(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.layers[0].gradient_checkpointing
    assert model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0].gradient_checkpointing
    loss_ckpt, grads_ckpt = grads_after_backward(model, batch)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6)


# --- saving and loading ---------------------------------------------------------------------------------------


def test_save_and_reload_is_bit_exact(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert saved == {name for name, _ in tiny_model.named_parameters()}  # official names, embedding stored once
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, Phi3VForCausalLM)
    original = tiny_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_remote_code_is_never_run_by_default(tiny_dir, tmp_path):
    """A folder whose config points at checkpoint-supplied code loads our classes, not that code."""
    folder = tmp_path / "with_remote_code"
    folder.mkdir()
    for file in tiny_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_phi3_v.py", "modeling_phi3_v.py"):
        (folder / name).write_text("raise RuntimeError('checkpoint-supplied code was executed')\n")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is Phi3VForCausalLM


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_training_loss_from_supervised_positions_only_equals_the_full_logits_loss(
    tiny_dir, tiny_processor, num_items_in_batch
):
    """In training mode the LM head runs only where a label is predicted; loss and every gradient must equal
    the loss over the full [B, L, vocab] logits, as the original computed it."""
    samples = [
        Conversation([Turn("What is shown?", "a red square", [noise_image(90, 50)])]),
        Conversation([Turn("Colour?", "green", [noise_image(40, 40, seed=1)]), Turn("And now?", "blue")]),
    ]
    batch = training_batch(tiny_processor, samples)
    labels = batch.pop("labels")
    results = []
    for sliced in (False, True):
        torch.manual_seed(0)
        model = Phi3VForCausalLM.from_pretrained(tiny_dir).train()
        if sliced:
            outputs = model(**batch, labels=labels, num_items_in_batch=num_items_in_batch)
            assert outputs.logits.shape == ((labels[:, 1:] != -100).sum(), model.config.vocab_size)
            loss = outputs.loss
        else:
            logits = model(**batch).logits
            assert logits.shape[:2] == labels.shape
            loss = model.loss_function(logits, labels, model.config.vocab_size, num_items_in_batch=num_items_in_batch)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (full_loss, full_grads), (loss, grads) = results
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == full_grads.keys() and len(grads) > 50
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)
