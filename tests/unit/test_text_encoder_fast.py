"""The text encoder as the server runs it: the stock forward's prompt embeddings, without its language-model head,
the hidden states of every layer or a key/value cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline, QwenImagePipeline
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from qwen_image_server.jobs import Job
from qwen_image_server.models.processor import load_processor
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.spec import resolve_model
from qwen_image_server.models.text_encoder_fast import MARK, prepare_text_encoder


@pytest.fixture(scope="module")
def pipes(tiny_t2i, tiny_edit_plus) -> dict:
    """The tiny text-to-image and edit-plus pipelines as diffusers loads them (stock text encoders)."""
    plus = QwenImageEditPlusPipeline.from_pretrained(tiny_edit_plus, processor=load_processor(tiny_edit_plus / "processor"))
    return {"text-to-image": QwenImagePipeline.from_pretrained(tiny_t2i), "edit-plus": plus}


class LanguageModelCalls:
    """The keyword arguments of each call of the encoder's decoder (``model.language_model``)."""

    def __init__(self, encoder):
        self.kwargs: list[dict] = []
        encoder.model.language_model.register_forward_pre_hook(lambda m, a, kw: self.kwargs.append(kw), with_kwargs=True)


def _embeddings(pipe, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = ["a lighthouse on a cliff at dusk, oil painting", "fog"]  # two lengths: padding and the mask matter
    if kind == "text-to-image":
        return pipe.encode_prompt(prompts, device="cpu")
    rng = np.random.default_rng(3)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in ((56, 84), (84, 56))]
    return pipe.encode_prompt(prompts[0], image=images, device="cpu")


@pytest.mark.parametrize("kind", ["text-to-image", "edit-plus"])
def test_prompt_embeddings_are_the_stock_encoders(pipes, kind):
    pipe = pipes[kind]
    stock = pipe.text_encoder
    expected, expected_mask = _embeddings(pipe, kind)
    prepared = copy.deepcopy(stock)
    assert prepare_text_encoder(prepared) and getattr(prepared, MARK)
    calls = LanguageModelCalls(prepared)
    pipe.text_encoder = prepared
    try:
        embeddings, mask = _embeddings(pipe, kind)
    finally:
        pipe.text_encoder = stock
    assert torch.equal(embeddings, expected), "the same tensor as the stock forward's hidden_states[-1]"
    assert (mask is None and expected_mask is None) or torch.equal(mask, expected_mask)
    assert len(calls.kwargs) == 1 and calls.kwargs[0]["use_cache"] is False
    assert not calls.kwargs[0].get("output_hidden_states"), "no hidden states of every layer"
    assert not any("lm_head" in name for name, _ in prepared.named_modules())


def _untied_encoder(tiny_t2i) -> Qwen2_5_VLForConditionalGeneration:
    """The tiny text encoder's architecture with a head of its own, as Qwen2.5-VL-7B has (not tied to the embeddings)."""
    values = Qwen2_5_VLConfig.from_pretrained(tiny_t2i / "text_encoder").to_dict()
    values["tie_word_embeddings"] = False
    values["text_config"]["tie_word_embeddings"] = False
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**values)).eval()
    assert encoder.lm_head.weight is not encoder.model.language_model.embed_tokens.weight
    return encoder


def test_a_head_of_its_own_is_freed_and_the_embeddings_stay(tiny_t2i):
    encoder = _untied_encoder(tiny_t2i)
    before = sum(p.numel() for p in encoder.parameters())
    head = encoder.lm_head.weight.numel()
    embeddings = encoder.model.language_model.embed_tokens.weight
    assert prepare_text_encoder(encoder)
    assert sum(p.numel() for p in encoder.parameters()) == before - head
    assert encoder.model.language_model.embed_tokens.weight is embeddings
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        out = encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        assert out.hidden_states[-1].shape == (1, 4, encoder.config.text_config.hidden_size)
        with pytest.raises(TypeError, match="no language-model head"):
            encoder(input_ids=ids, labels=ids)
    assert not prepare_text_encoder(encoder), "prepared once (a shared encoder is seen by each model)"
    assert not prepare_text_encoder(torch.nn.Linear(4, 4)), "another class is left alone"


def test_the_server_loads_its_text_encoder_prepared_and_makes_the_stock_image(tiny_t2i, pipes):
    runner = PipelineRunner(resolve_model(str(tiny_t2i)), device="cpu", warm=False)
    assert getattr(runner.pipe.text_encoder, MARK) and not hasattr(runner.pipe.text_encoder, "lm_head")
    runner.prompt_cache.max_entries = 0  # every run encodes its prompts
    job = Job(mode="generate", prompt="a red cube", negative_prompt="blur", seeds=[5], width=64, height=64, num_inference_steps=2)
    image = np.asarray(runner.run(job)[0])
    runner.pipe.text_encoder = pipes["text-to-image"].text_encoder  # the stock forward, the same weights
    assert np.array_equal(np.asarray(runner.run(job)[0]), image)
