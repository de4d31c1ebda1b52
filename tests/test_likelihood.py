"""Label likelihoods (the classification recipes' AUROC scores): batched, left-padded and with images repeated
per label, they equal one plain forward pass per sample and label."""

import pytest
import torch

from phi3v.data.conversation import ANSWER_SUFFIX, Conversation, Turn
from phi3v.data.samples import EvaluationSamples
from phi3v.data.sources import RowSource
from phi3v.likelihood import label_log_likelihoods
from tests.conftest import noise_image


def test_label_likelihoods_equal_a_plain_forward_pass(tiny_model, tiny_processor):
    """Left padding, position ids, images repeated per label and the kept logits give exactly what one
    unpadded forward pass per sample and label gives."""
    images = [noise_image(90, 60, seed=0), noise_image(40, 120, seed=1)]
    conversations = [
        Conversation([Turn("Is it red?", "", [images[0]])]),
        Conversation([Turn("A much longer question about the second picture?", "", [images[1]])]),
        Conversation([Turn("No image here.", "", [])]),
    ]
    source = RowSource.of(conversations, "test")
    dataset = EvaluationSamples(source, source.indices, lambda c: c, tiny_processor)
    labels = ["yes", "no", "not at all"]
    scored = label_log_likelihoods(tiny_model, tiny_processor, dataset, [0, 1, 2], labels, batch_size=2)
    assert [r["index"] for r in scored] == [0, 1, 2]
    for result in scored:
        example = dataset[result["index"]]
        for label, score in zip(labels, result["scores"]):
            answer = tiny_processor.tokenizer(label + ANSWER_SUFFIX, add_special_tokens=False).input_ids
            ids = torch.cat([example["input_ids"], torch.tensor(answer)])[None]
            images_in = {k: example[k] for k in ("pixel_values", "image_sizes") if k in example}
            with torch.no_grad():
                log_probs = tiny_model(input_ids=ids, **images_in).logits[0].log_softmax(-1)
            start = len(example["input_ids"])
            expected = sum(log_probs[start + j - 1, token].item() for j, token in enumerate(answer))
            assert score == pytest.approx(expected, abs=1e-4)
