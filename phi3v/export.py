"""Export a finished run as a standalone model folder in the official Phi-3.5-vision layout.

    python -m phi3v.export --model OUTPUT_DIR --out DIR [--base PATH] [--dtype bfloat16|float16|float32] [--overwrite]
    python -m phi3v.export --model OUTPUT_DIR --out DIR --checkpoint best     # or latest, or a step: 400
    python -m phi3v.export --model OUTPUT_DIR --out DIR --num_crops 16       # the crop count a server uses

By default the run's final model is exported; ``--checkpoint`` exports one of its complete checkpoints
instead (best: the one best_checkpoint.json names, written by --save_best), with the run's processor.

A LoRA or QLoRA run's adapters (language model, CLIP and projector) are merged into the unquantized base
model; a full finetune is copied. The folder holds what the official checkpoint holds, so the original
remote code, vLLM's Phi-3-vision loader and ``phi3v`` all load it:
- safetensors shards with the official tensor names and shapes and ``model.safetensors.index.json``;
- ``config.json`` with the official keys (``model_type`` phi3_v, ``architectures``, ``auto_map``,
  ``embd_layer``, ``img_processor``, ``rope_scaling`` of type "su", ``torch_dtype``) and
  ``generation_config.json``, which stops at ``<|end|>``, ``<|endoftext|>`` and ``</s>``;
- the tokenizer files, from the base model's folder when it is a local copy of the official checkpoint
  (otherwise from the run), and ``preprocessor_config.json`` / ``processor_config.json`` in the official
  format with the ``num_crops`` the run trained with;
- the official remote-code files (``*_phi3_v.py``), from the base model's folder, or from the hub
  repository a hub-based run started from (vLLM and ``trust_remote_code`` need them; ``phi3v`` does not).
Last, the exported folder is loaded back and its logits on an image-and-text sample are compared with
the run's; the largest difference is printed.

``--out`` may not be the run folder or its base model, nor lie inside or hold either; a folder that holds
anything is refused unless ``--overwrite``, which replaces it. The export is written to a temporary folder
beside ``--out`` and renamed at the end, so an interrupted export never leaves a half-written ``--out``.
"""

from __future__ import annotations

import logging
import sys

from .args import parse_args
from .errors import command
from .exporting import export
from .program_args import ExportArguments


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(ExportArguments, argv, __doc__)
    logging.basicConfig(level=logging.WARNING)
    export(args.model, args.out, args.base, args.dtype, args.overwrite, args.checkpoint, args.num_crops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
