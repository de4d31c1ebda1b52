"""--use_liger_kernel: refused where it cannot run, patches exactly the decoder's norms and MLPs of this one
model, and (on a CUDA GPU) gives the loss and gradients of the plain model."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers.models.phi3 import modeling_phi3

from phi3v import Phi3VForCausalLM
from phi3v.args import RecipeArguments, parse_args
from phi3v.models.liger import apply_liger_kernels
from phi3v.training.preparation import base_model, prepare_for_training
from tests.conftest import loss_and_gradients

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels run on CUDA GPUs only")


def usage_error(capsys) -> str:
    """The message of the usage error --use_liger_kernel gets, before anything loads."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(RecipeArguments, ["--use_liger_kernel"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_flag_is_refused_without_a_gpu(capsys):
    assert "--use_liger_kernel needs a CUDA GPU" in usage_error(capsys)


def test_the_flag_is_refused_without_the_package(monkeypatch, capsys):
    find_spec = importlib.util.find_spec

    def without_liger(name, *rest):
        return None if name == "liger_kernel" else find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", without_liger)
    assert "pip install liger-kernel==0.8.5" in usage_error(capsys)


def module_kinds(model) -> dict[str, str]:
    """Name of every module -> the class its forward reports (Liger's patch renames what it patches)."""
    return {name: module._get_name() for name, module in model.named_modules()}


def test_only_the_decoder_norms_and_mlps_of_this_model_change(tiny_dir):
    model = Phi3VForCausalLM.from_pretrained(tiny_dir)
    before, weights = module_kinds(model), {k: v.clone() for k, v in model.state_dict().items()}
    apply_liger_kernels(model)
    after = module_kinds(model)

    changed = {name: kind for name, kind in after.items() if before[name] != kind}
    layers = model.config.num_hidden_layers
    expected = {"model.norm": "LigerRMSNorm"}
    for i in range(layers):
        expected[f"model.layers.{i}.mlp"] = "LigerPhi3SwiGLUMLP"
        expected[f"model.layers.{i}.input_layernorm"] = "LigerRMSNorm"
        expected[f"model.layers.{i}.post_attention_layernorm"] = "LigerRMSNorm"
    assert changed == expected  # CLIP, the projector, attention and the LM head keep their own forward
    assert "forward" not in model.__dict__  # the forward that merges image features and trims the LM head stays

    state = model.state_dict()  # same names and values: checkpoints and exports do not change
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)

    # transformers' Phi-3 module is as it was, so a model built afterwards is plain
    assert modeling_phi3.Phi3MLP.__name__ == "Phi3MLP" and modeling_phi3.Phi3RMSNorm.__name__ == "Phi3RMSNorm"
    assert modeling_phi3.apply_rotary_pos_emb.__module__ == modeling_phi3.__name__
    assert module_kinds(Phi3VForCausalLM.from_pretrained(tiny_dir)) == before


def test_lora_adapts_the_patched_mlp(tiny_dir, monkeypatch):
    """Through the recipes' preparation: Liger first, then LoRA wraps the projections the patched MLP calls."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the flag's check; the kernels are not run
    args = parse_args(RecipeArguments, ["--use_liger_kernel", "--use_lora", "--lora_rank", "4"])
    model = prepare_for_training(Phi3VForCausalLM.from_pretrained(tiny_dir), args)
    mlp = base_model(model).model.layers[0].mlp
    assert mlp._get_name() == "LigerPhi3SwiGLUMLP"
    assert type(mlp.gate_up_proj).__module__.startswith("peft.") and type(mlp.down_proj).__module__.startswith("peft.")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("mode", [[], ["--use_lora", "--lora_rank", "4"]], ids=["full", "lora"])
def test_liger_gives_the_same_loss_and_gradients(tiny_dir, tiny_processor, mode, dtype):
    autocast = None if dtype == torch.float32 else dtype
    reference_loss, reference = loss_and_gradients(tiny_dir, tiny_processor, mode, "cuda", autocast)
    loss, gradients = loss_and_gradients(tiny_dir, tiny_processor, [*mode, "--use_liger_kernel"], "cuda", autocast)
    if dtype == torch.float32:  # only the order of the sums differs
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=0)
        for name, grad in gradients.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    else:  # bf16 rounds each element differently; each gradient as a whole must agree
        torch.testing.assert_close(loss, reference_loss, rtol=1e-2, atol=0)
        for name, grad in gradients.items():
            error = (grad.float() - reference[name].float()).norm() / reference[name].float().norm().clamp_min(1e-12)
            assert error < 3e-2, f"{name}: relative error {error:.1e}"
