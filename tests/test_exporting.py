"""Exporting a finished run as a standalone folder in the official layout: where it may go, what it holds,
that it loads back with the run's logits, and that a failed export leaves nothing behind."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoProcessor, AutoTokenizer

from phi3v import Phi3VConfig, Phi3VForCausalLM
from phi3v import exporting as exporting_module
from phi3v import inference as inference_module
from phi3v.errors import RecipeError
from phi3v.exporting import LEFTOVERS, TOKENIZER_FILES, check_destination, export
from phi3v.models.families import PHI_3_5_VISION, official_config
from phi3v.training.loading import load_model

REMOTE_CODE = PHI_3_5_VISION.remote_code

# The keys of microsoft/Phi-3.5-vision-instruct's config.json (but _name_or_path and _attn_implementation).
OFFICIAL_KEYS = {
    "architectures", "attention_dropout", "auto_map", "bos_token_id", "embd_layer", "embd_pdrop", "eos_token_id",
    "hidden_act", "hidden_size", "img_processor", "initializer_range", "intermediate_size", "max_position_embeddings",
    "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "original_max_position_embeddings", "pad_token_id", "resid_pdrop", "rms_norm_eps", "rope_scaling", "rope_theta",
    "sliding_window", "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache", "vocab_size",
}  # fmt: skip


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as opened:
            found |= {name: opened.get_tensor(name) for name in opened.keys()}
    return found


@pytest.fixture(scope="module")
def base_dir(tiny_dir, tmp_path_factory) -> Path:
    """A local base model folder, as a copy of the official one would be, with the remote-code files."""
    base = tmp_path_factory.mktemp("base") / "tiny"
    shutil.copytree(tiny_dir, base)
    for name in REMOTE_CODE:
        (base / name).write_text(f"# the official {name}\n")
    return base


@pytest.fixture(scope="module")
def full_run(base_dir, tmp_path_factory) -> Path:
    """A full finetune's --output_dir: the (here unchanged) weights, the processor, and run_args.json."""
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(base_dir, run, ignore=shutil.ignore_patterns("*_phi3_v.py"))
    (run / "run_args.json").write_text(json.dumps({"flags": {"model_name_or_path": str(base_dir), "num_crops": 4}}))
    return run


@pytest.fixture(scope="module")
def sample(tiny_processor) -> dict:
    return exporting_module._reference_sample(tiny_processor)


def logits(model, sample) -> torch.Tensor:
    with torch.no_grad():
        return model(**sample).logits


# --- where an export may go --------------------------------------------------------------------------------------


@pytest.fixture
def places(tmp_path) -> dict[str, Path]:
    run, base = tmp_path / "runs" / "lora", tmp_path / "models" / "tiny"
    run.mkdir(parents=True)
    base.mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    return {"run": run, "base": base}


@pytest.mark.parametrize(
    "where",
    [
        lambda p: p["run"],
        lambda p: p["run"] / "export",
        lambda p: p["run"].parent,
        lambda p: p["base"],
        lambda p: p["base"] / "sub" / "export",
        lambda p: p["base"].parent.parent,
        lambda p: p["run"] / ".." / "lora",
    ],
    ids=["the_run", "inside_the_run", "above_the_run", "the_base", "inside_the_base", "above_both", "dotdot"],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_run_and_its_base_are_never_overwritten(places, where, overwrite):
    out = where(places)
    with pytest.raises(RecipeError, match=r"would overwrite .* \(the run or its base model\): pick a folder outside"):
        check_destination(out, [places["run"], places["base"]], overwrite)


def test_a_new_or_empty_folder_is_fine(places, tmp_path):
    check_destination(tmp_path / "exports" / "new", [places["run"], places["base"]], False)
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", [places["run"], places["base"]], False)


def test_a_folder_with_files_needs_overwrite(places, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("x")
    with pytest.raises(RecipeError) as raised:
        check_destination(tmp_path / "used", [places["run"]], False)
    assert str(raised.value) == (
        f"--out {tmp_path / 'used'} already holds files: pick an empty or new folder, or pass --overwrite to "
        "replace it."
    )
    check_destination(tmp_path / "used", [places["run"]], True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RecipeError, match="already holds files"):
        check_destination(tmp_path / "a_file", [places["run"]], False)


def test_a_base_that_is_no_folder_protects_nothing(places, tmp_path):
    """A hub id as base names no local folder: any destination outside the run is fine."""
    check_destination(
        tmp_path / "microsoft" / "export", [places["run"], Path("microsoft/Phi-3.5-vision-instruct")], False
    )


# --- config.json -------------------------------------------------------------------------------------------------


def test_official_config_has_the_official_keys_and_reads_back(tiny_dir):
    config = Phi3VConfig.from_pretrained(tiny_dir)
    written = official_config(config, "bfloat16")
    assert set(written) == OFFICIAL_KEYS
    assert written["model_type"] == "phi3_v" and written["architectures"] == ["Phi3VForCausalLM"]
    assert written["torch_dtype"] == "bfloat16" and written["use_cache"] is True
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_phi3_v.Phi3VForCausalLM"
    rope = config.rope_parameters
    assert written["rope_scaling"] == {"long_factor": rope["long_factor"], "short_factor": rope["short_factor"],
                                       "type": "su"}  # fmt: skip
    again = Phi3VConfig(**json.loads(json.dumps(written)))
    assert again.rope_parameters == rope
    assert (again.embd_layer, again.img_processor) == (config.embd_layer, config.img_processor)
    assert (again.hidden_size, again.num_hidden_layers, again.vocab_size) == (64, 2, config.vocab_size)


# --- export ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(full_run, tmp_path_factory) -> tuple[Path, float, str]:
    out = tmp_path_factory.mktemp("exports") / "phi35v"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        difference = export(full_run, out, dtype="float32")
    return out, difference, printed.getvalue()


def test_an_export_loads_back_with_the_same_logits(exported, full_run, tiny_model, sample):
    out, difference, printed = exported
    assert difference < 1e-5
    assert f"Exported full run {full_run} to {out} (float32, " in printed
    assert "Largest logit difference from the run on an image-and-text sample: " in printed
    model = load_model(out, device="cpu").eval()
    torch.testing.assert_close(logits(model, sample), logits(tiny_model, sample), rtol=0, atol=1e-5)


def test_an_export_holds_the_official_files(exported, tiny_dir, base_dir):
    out, _, _ = exported
    names = {p.name for p in out.iterdir()}
    official = {"config.json", "generation_config.json", "model.safetensors.index.json", "preprocessor_config.json",
                "model-00001-of-00001.safetensors", "processor_config.json"}  # fmt: skip
    assert official <= names
    assert {name for name in TOKENIZER_FILES if (tiny_dir / name).is_file()} <= names
    for name in REMOTE_CODE:  # from the local base
        assert (out / name).read_text() == f"# the official {name}\n"
    config = json.loads((out / "config.json").read_text())
    assert set(config) == OFFICIAL_KEYS and config["model_type"] == "phi3_v" and config["torch_dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = tensors(out)
    assert set(index["weight_map"]) == set(written) == set(tensors(tiny_dir))  # the official names
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert (preprocessor["num_crops"], preprocessor["crop_size"]) == (4, 56)
    assert preprocessor["auto_map"]["AutoProcessor"] == "processing_phi3_v.Phi3VProcessor"
    generation = json.loads((out / "generation_config.json").read_text())
    vocabulary = AutoTokenizer.from_pretrained(tiny_dir).get_vocab()
    stops = [vocabulary[token] for token in ("<|end|>", "<|endoftext|>", "</s>")]  # what every answer ends with
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, stops)
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_an_export_with_another_crop_count(full_run, tmp_path, capsys):
    difference = export(full_run, tmp_path / "crops", dtype="float32", num_crops=2)
    assert difference < 1e-5  # checked on a sample encoded with 2 crops
    assert json.loads((tmp_path / "crops" / "preprocessor_config.json").read_text())["num_crops"] == 2
    assert AutoProcessor.from_pretrained(tmp_path / "crops").image_processor.num_crops == 2


def test_a_bfloat16_export(full_run, tmp_path, capsys):
    difference = export(full_run, tmp_path / "bf16")
    assert 0 < difference < 0.1  # rounded weights, the same model
    assert {t.dtype for t in tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_overwrite_replaces_the_folder(full_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("stale")
    with pytest.raises(RecipeError, match="already holds files"):
        export(full_run, out, dtype="float32")
    assert (out / "old.txt").is_file()
    export(full_run, out, dtype="float32", overwrite=True)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()


def test_the_run_itself_is_refused_before_anything_is_written(full_run, capsys):
    before = sorted(p.name for p in full_run.iterdir())
    with pytest.raises(RecipeError, match="would overwrite"):
        export(full_run, full_run / "export")
    assert sorted(p.name for p in full_run.iterdir()) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_export_that_fails_midway_leaves_no_out(full_run, tmp_path, monkeypatch, overwrite):
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "previous.txt").write_text("the previous export")
    written = []

    def fail(model, processor, folder):
        written.extend(p.name for p in folder.iterdir())  # the shards are there already
        raise KeyboardInterrupt

    monkeypatch.setattr(exporting_module, "_write_generation_config", fail)
    with pytest.raises(KeyboardInterrupt):
        export(full_run, out, dtype="float32", overwrite=overwrite)
    assert "model.safetensors.index.json" in written
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if overwrite else [])  # no partial folder beside it
    if overwrite:
        assert [p.name for p in out.iterdir()] == ["previous.txt"]  # untouched


def test_a_lora_run_is_merged_into_its_base(tiny_dir, tiny_processor, sample, tmp_path, capsys):
    torch.manual_seed(4)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "fc1"], init_lora_weights=False)
    peft_model = get_peft_model(Phi3VForCausalLM.from_pretrained(tiny_dir), config).eval()
    run = tmp_path / "lora"
    peft_model.save_pretrained(run)
    tiny_processor.save_pretrained(run)
    expected = logits(peft_model, sample)
    difference = export(run, tmp_path / "merged", dtype="float32")
    assert difference < 1e-4
    assert "Exported lora run" in capsys.readouterr().out
    assert not [name for name in tensors(tmp_path / "merged") if LEFTOVERS.search(name)]
    merged = load_model(tmp_path / "merged", device="cpu").eval()
    torch.testing.assert_close(logits(merged, sample), expected, rtol=1e-4, atol=1e-4)


# --- the remote code a server runs -----------------------------------------------------------------------------

HUB_BASE = "microsoft/Phi-3.5-vision-instruct"


@pytest.fixture
def hub_based_lora_run(tiny_dir, tiny_processor, tmp_path, monkeypatch) -> Path:
    """A LoRA run whose adapter config names the hub id, as a run trained from the hub's checkpoint is. The hub
    is mocked: the tiny checkpoint stands in for the hub's weights."""
    peft_model = get_peft_model(Phi3VForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, target_modules=["fc1"]))
    run = tmp_path / "lora"
    peft_model.save_pretrained(run)
    tiny_processor.save_pretrained(run)
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": HUB_BASE}))
    real_load_model = inference_module.load_model

    def load_model(source, **kwargs):
        return real_load_model(tiny_dir if source == HUB_BASE else source, **kwargs)

    monkeypatch.setattr(inference_module, "load_model", load_model)
    return run


def test_a_hub_based_run_gets_the_remote_code_from_its_hub_repository(hub_based_lora_run, tmp_path, monkeypatch):
    fetched = []

    def hub_download(repo_id: str, filename: str) -> str:
        fetched.append((repo_id, filename))
        (tmp_path / "hub").mkdir(exist_ok=True)
        (tmp_path / "hub" / filename).write_text(f"# {repo_id} {filename}\n")
        return str(tmp_path / "hub" / filename)

    monkeypatch.setattr(exporting_module, "hf_hub_download", hub_download)
    export(hub_based_lora_run, tmp_path / "out", dtype="float32")
    assert fetched == [(HUB_BASE, name) for name in REMOTE_CODE]
    for name in REMOTE_CODE:
        assert (tmp_path / "out" / name).read_text() == f"# {HUB_BASE} {name}\n"


def test_offline_the_export_says_which_files_to_copy_from_where(hub_based_lora_run, tmp_path, monkeypatch, caplog):
    def offline(repo_id: str, filename: str) -> str:
        raise OSError("offline")

    monkeypatch.setattr(exporting_module, "hf_hub_download", offline)
    export(hub_based_lora_run, tmp_path / "out", dtype="float32")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # everything else is written
    message = next(record.getMessage() for record in caplog.records if "remote-code" in record.getMessage())
    assert f"could not be fetched from {HUB_BASE}" in message and ", ".join(REMOTE_CODE) in message
    assert f"https://huggingface.co/{HUB_BASE}/tree/main into {tmp_path / 'out'}" in message


def test_a_local_base_without_the_remote_code_gets_the_same_message(full_run, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(full_run, bare)
    (bare / "run_args.json").write_text(json.dumps({"flags": {"model_name_or_path": str(bare)}}))
    export(bare, tmp_path / "out", dtype="float32")
    message = next(record.getMessage() for record in caplog.records if "remote-code" in record.getMessage())
    assert f"the base model folder {bare} does not hold them" in message and ", ".join(REMOTE_CODE) in message
