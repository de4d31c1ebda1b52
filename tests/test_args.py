"""Recipe flags: original defaults, implications, and early errors."""

import pytest

from phi3v.args import RecipeArguments, gradient_accumulation_steps, parse_args
from phi3v.errors import RecipeError
from phi3v.program_args import ExportArguments, PredictArguments, RunsArguments, SyntheticArguments, TinyArguments


def test_original_defaults():
    args = parse_args(RecipeArguments, [])
    assert args.model_name_or_path == "microsoft/Phi-3.5-vision-instruct"
    assert (args.batch_size, args.num_crops, args.num_train_epochs) == (16, 16, 1)
    assert (args.learning_rate, args.wd, args.warmup_steps, args.logging_steps) == (4.0e-5, 0.01, 50, 10)
    assert (args.lora_rank, args.lora_alpha_ratio, args.lora_dropout) == (64, 2.0, 0.0)
    assert (args.bf16, args.use_lora, args.use_qlora, args.freeze_vision_model) == (False, False, False, False)
    assert args.output_dir == "./output/" and args.max_new_tokens == 64
    assert args.deepspeed.endswith("ds_configs/zero2.json") and args.uses_deepspeed


def test_implied_flags():
    args = parse_args(RecipeArguments, ["--use_qlora", "--use_flash_attention"])
    assert args.use_lora and args.bf16 and not args.uses_deepspeed
    assert parse_args(RecipeArguments, ["--no-tqdm"]).no_tqdm
    assert not parse_args(RecipeArguments, ["--deepspeed", "none"]).uses_deepspeed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_crops", "17"], "num_crops"),
        (["--num_crops", "0"], "num_crops"),
        (["--batch_size", "0"], "batch_size"),
        (["--max_eval_samples", "0"], "max_eval_samples"),
        (["--save_steps", "0"], "save_steps must be at least 1"),
        (["--save_total_limit", "0"], "save_total_limit must be at least 1"),
        (["--max_length", "0"], "max_length must be at least 1"),
        (["--deepspeed", "missing.json"], "no such file"),
    ],
)
def test_bad_flags_fail_before_anything_loads(argv, message, capsys):
    """A usage error naming the flag (exit status 2, as argparse), not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(RecipeArguments, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_flag_is_an_error(capsys):
    for argv in (["--learning-rat", "1"], ["--not_a_flag"]):
        with pytest.raises(SystemExit):
            parse_args(RecipeArguments, argv)
        assert "not used" in capsys.readouterr().err


def test_checkpoint_and_data_flags_default_to_the_original_behaviour():
    args = parse_args(RecipeArguments, [])
    assert args.save_steps is None and args.save_total_limit is None and args.resume_from_checkpoint is None
    assert args.max_length is None and not args.skip_bad_samples and not args.overwrite_output_dir


@pytest.mark.parametrize(
    "batch, world, per_gpu, expected", [(16, 1, 1, 16), (16, 4, 1, 4), (64, 8, 2, 4), (6, 3, 2, 1), (8, 2, 4, 1)]
)
def test_gradient_accumulation(batch, world, per_gpu, expected):
    assert gradient_accumulation_steps(batch, world, per_gpu) == expected


def test_gradient_accumulation_must_divide():
    with pytest.raises(RecipeError, match="not a multiple of world size 3 x --batch_size_per_gpu 2 = 6"):
        gradient_accumulation_steps(16, 3, 2)


def test_programs_parse_positionals_and_repeated_flags_like_the_recipes():
    runs = parse_args(RunsArguments, ["runs/a", "runs/b", "--csv"])
    assert runs.paths == ["runs/a", "runs/b"] and runs.csv is True
    assert parse_args(SyntheticArguments, ["nlvr2", "--out", "d"]).task == "nlvr2"
    once = parse_args(PredictArguments, ["--model", "m", "--question", "q", "--image", "a.png", "b.png"])
    repeated = parse_args(PredictArguments, ["--model", "m", "--question", "q", "--image", "a.png", "--image", "b.png"])
    assert once.image == repeated.image == ["a.png", "b.png"]


@pytest.mark.parametrize(
    "arguments, argv, message",
    [
        (SyntheticArguments, ["mnist", "--out", "d"], "invalid choice: 'mnist'"),
        (ExportArguments, ["--model", "m"], "the following arguments are required: --out"),
        (PredictArguments, ["--model", "m"], "give either --question"),
        (PredictArguments, ["--model", "m", "--questions", "q.jsonl"], "--questions needs --answers"),
        (TinyArguments, ["--out", "d", "--crop_size", "50"], "must be a multiple of 2 x --patch_size 14"),
        (RunsArguments, [], "the following arguments are required: paths"),
    ],
)
def test_bad_program_flags_are_usage_errors(arguments, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(arguments, argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
