"""The one model loader: dtype, attention, device, random weights from a config, 4-bit, a run's adapters;
and the recipes' flags turned into its arguments."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from phi3v import Phi3VConfig, Phi3VForCausalLM
from phi3v.args import RecipeArguments
from phi3v.errors import RecipeError
from phi3v.training import loading
from phi3v.training.loading import load_for_recipe, load_model, load_processor, load_trained_for_evaluation
from tests.conftest import noise_image


def recipe_args(model: str, **flags) -> RecipeArguments:
    return RecipeArguments(model_name_or_path=str(model), deepspeed="none", **flags)


def batch(processor, question: str = "What colour is the shape?"):
    image = noise_image(60, 40, seed=1)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|image_1|>\n{question}"}], tokenize=False, add_generation_prompt=True
    )
    return processor(prompt, [image])


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items()}


# --- load_model ----------------------------------------------------------------------------------------------


def test_a_folder_loads_its_weights_in_fp32_with_sdpa_on_the_cpu(tiny_dir, tiny_model):
    model = load_model(tiny_dir)
    assert type(model) is Phi3VForCausalLM and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.config._attn_implementation == "sdpa"
    expected = parameters(tiny_model)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in parameters(model).items())


def test_dtype_and_attention_are_as_asked(tiny_dir, tiny_processor):
    model = load_model(str(tiny_dir), dtype=torch.bfloat16, attention="eager", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert model.model.vision_embed_tokens.img_processor.vision_model.config._attn_implementation == "eager"
    assert logits(model, batch(tiny_processor)).dtype == torch.bfloat16


def test_flash_attention_falls_back_to_sdpa_without_the_package(tiny_dir, caplog):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with caplog.at_level(logging.WARNING, logger="phi3v.models.modeling"):
        model = load_model(tiny_dir, dtype=torch.bfloat16, attention="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert "flash-attn package is not installed" in caplog.text and "using 'sdpa' instead" in caplog.text


def test_a_config_gives_random_weights_of_that_config_from_the_callers_seed(tiny_dir, tiny_model):
    def config() -> Phi3VConfig:  # one each: the model keeps (and transformers sets dtype and attention on) it
        config = Phi3VConfig.from_pretrained(tiny_dir)
        config.num_hidden_layers = 1
        return config

    torch.manual_seed(7)
    first = load_model(config(), dtype=torch.bfloat16, attention="eager", device="cpu")
    torch.manual_seed(7)
    second = load_model(config(), device="cpu")
    assert type(first) is Phi3VForCausalLM and len(first.model.layers) == 1
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}
    assert first.config._attn_implementation == "eager" and second.config._attn_implementation == "sdpa"
    checkpoint = parameters(tiny_model)
    for name, tensor in parameters(second).items():
        assert tensor.shape == checkpoint[name].shape, name
        assert torch.equal(tensor.bfloat16(), parameters(first)[name]), name  # the same seed, the same weights
    weight = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(parameters(second)[weight], checkpoint[weight])  # not the saved ones


def test_a_config_cannot_be_quantized(tiny_dir):
    with pytest.raises(ValueError, match="give a folder, not a config"):
        load_model(Phi3VConfig.from_pretrained(tiny_dir), quantize_4bit=True)


def test_4bit_on_the_cpu_computes_in_fp32_and_stays_trainable(tiny_dir):
    bnb = pytest.importorskip("bitsandbytes")
    model = load_model(tiny_dir, dtype=torch.bfloat16, quantize_4bit=True, device="cpu")
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
    assert layer.compute_dtype == torch.float32  # fp16 kernels are GPU-only
    repacking = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert repacking and not any(m.support_avx512bf16_for_cpu for m in repacking)


def test_a_missing_folder_is_named_with_its_flag(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(RecipeError) as raised:
        load_model(missing)
    assert str(raised.value) == f"--model_name_or_path {missing}: no such folder."
    with pytest.raises(RecipeError, match=r"^--base .*: no such folder\.$"):
        load_model(str(missing), flag="--base")


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    """A LoRA run's folder (adapters on the tiny checkpoint, non-zero so they change the output), and the
    in-memory PEFT model it was saved from."""
    base = Phi3VForCausalLM.from_pretrained(tiny_dir).eval()
    torch.manual_seed(3)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, config).eval()
    folder = tmp_path_factory.mktemp("lora_run")
    peft_model.save_pretrained(folder)
    return folder, peft_model


def test_adapters_are_applied_unmerged_on_the_base(tiny_dir, tiny_model, tiny_processor, lora_run):
    folder, in_memory = lora_run
    model = load_model(tiny_dir, adapters=folder, device="cpu")
    assert isinstance(model, PeftModel)
    assert hasattr(model.base_model.model.model.layers[0].self_attn.qkv_proj, "lora_A")  # not merged
    inputs = batch(tiny_processor)
    reloaded = logits(model, inputs)
    torch.testing.assert_close(reloaded, logits(in_memory, inputs))
    assert (reloaded - logits(tiny_model, inputs)).abs().max() > 1e-3  # the adapters do something


# --- the recipes' flags ----------------------------------------------------------------------------------------


@pytest.fixture
def asked(monkeypatch):
    """What load_for_recipe asks load_model for."""
    calls = []
    monkeypatch.setattr(loading, "load_model", lambda source, **kwargs: calls.append((source, kwargs)) or "model")
    return calls


def test_plain_flags_ask_for_fp32_and_sdpa(asked):
    assert load_for_recipe(recipe_args("/models/tiny")) == "model"
    assert asked == [
        (
            "/models/tiny",
            {
                "dtype": torch.float32,
                "attention": "sdpa",
                "quantize_4bit": False,
                "adapters": None,
                "trust_remote_code": False,
            },
        )
    ]


def test_flash_attention_flag_asks_for_bf16_and_flash_attention_2(asked):
    args = recipe_args("/models/tiny", use_flash_attention=True, trust_remote_code=True)
    assert args.bf16  # implied
    load_for_recipe(args, quantize=True, path="/runs/out", adapters="/runs/lora")
    source, kwargs = asked[0]
    assert source == "/runs/out"
    assert kwargs == {
        "dtype": torch.bfloat16,
        "attention": "flash_attention_2",
        "quantize_4bit": True,
        "adapters": "/runs/lora",
        "trust_remote_code": True,
    }


def test_the_flash_attention_flag_loads_bf16_and_falls_back_to_sdpa(tiny_dir):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    model = load_for_recipe(recipe_args(tiny_dir, use_flash_attention=True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "sdpa"


def test_evaluation_after_lora_loads_the_base_with_the_runs_adapters(tiny_dir, tiny_processor, lora_run):
    folder, in_memory = lora_run
    model = load_trained_for_evaluation(recipe_args(tiny_dir, use_lora=True, output_dir=str(folder)))
    assert isinstance(model, PeftModel) and not model.training
    inputs = batch(tiny_processor)
    torch.testing.assert_close(logits(model, inputs), logits(in_memory, inputs))


def test_evaluation_after_full_finetuning_loads_the_output_dir(tiny_dir, asked, monkeypatch):
    unset = []
    monkeypatch.setattr(loading, "unset_hf_deepspeed_config", lambda: unset.append(True))

    class Model:
        def eval(self):
            return "evaluating"

    monkeypatch.setattr(loading, "load_model", lambda source, **kwargs: asked.append((source, kwargs)) or Model())
    assert load_trained_for_evaluation(recipe_args("/models/base", output_dir="/runs/full")) == "evaluating"
    assert [source for source, _ in asked] == ["/runs/full"] and asked[0][1]["adapters"] is None
    assert unset == [True]  # so from_pretrained does not shard the reloaded model under ZeRO-3


@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_the_processor_has_the_flags_num_crops(tiny_dir, num_crops):
    processor = load_processor(recipe_args(tiny_dir, num_crops=num_crops))
    assert processor.image_processor.num_crops == num_crops
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") != processor.tokenizer.unk_token_id


def test_the_processor_of_a_missing_folder(tmp_path):
    with pytest.raises(RecipeError, match=r"^--model_name_or_path .*gone: no such folder\.$"):
        load_processor(recipe_args(tmp_path / "gone"))
