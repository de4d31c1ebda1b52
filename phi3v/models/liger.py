"""--use_liger_kernel: Liger's Triton kernels for the decoder's RMSNorm and SwiGLU MLP (GPU only).

Two of Liger's Phi-3 patches apply, per model instance: RMSNorm (every decoder layer's two norms and the
final norm) and the SwiGLU MLP. The others do not:
- the fused linear cross-entropy replaces the model's forward, which here also merges the image features;
  that forward already runs the LM head only where a label is predicted, which is most of FLCE's gain;
- the RoPE patch swaps a function of transformers' Phi-3 module, so it would reach every Phi-3 model in
  the process, not just this one.
CLIP (LayerNorm and quick-GELU) keeps PyTorch's kernels.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for annotations: checking the flag needs no model code
    from .modeling import Phi3VForCausalLM

INSTALL_HINT = "pip install liger-kernel==0.8.5 (as requirements.txt pins it)"


def check_liger_available() -> None:
    """Raise before anything loads if --use_liger_kernel cannot run here."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(f"--use_liger_kernel needs the liger-kernel package: {INSTALL_HINT}.")
    if not torch.cuda.is_available():
        raise ValueError(
            "--use_liger_kernel needs a CUDA GPU: Liger's kernels are Triton GPU kernels. "
            "Drop the flag on this machine."
        )


def apply_liger_kernels(model: Phi3VForCausalLM) -> None:
    """Swap the forward of the decoder's norms and MLPs for Liger's, in place; weights and names stay the same,
    so checkpoints and exports are unchanged."""
    from liger_kernel.transformers import apply_liger_kernel_to_phi3
    from transformers.models.phi3 import modeling_phi3

    # With model= Liger patches the instance, but it also replaces the classes in transformers' Phi-3 module for
    # models built later; put them back so that only this model changes (the benchmark builds several).
    classes = modeling_phi3.Phi3RMSNorm, modeling_phi3.Phi3MLP
    try:
        apply_liger_kernel_to_phi3(
            rope=False, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True, model=model
        )
    finally:
        modeling_phi3.Phi3RMSNorm, modeling_phi3.Phi3MLP = classes
