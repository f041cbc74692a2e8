"""Prompt embeddings kept per worker: a prompt seen before skips the text encoder and gives the same image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_image_server.jobs import Job
from qwen_image_server.models.prompt_cache import PromptCache
from qwen_image_server.models.runner import PipelineRunner
from qwen_image_server.models.spec import resolve_model

SIZE = 128


def _job(prompt: str, seed: int = 1, **fields) -> Job:
    return Job(mode="generate", prompt=prompt, seeds=[seed], width=SIZE, height=SIZE, num_inference_steps=2, **fields)


class Encodes:
    """Counts the text encoder's forward passes."""

    def __init__(self, runner: PipelineRunner):
        self.calls = 0

        def count(module, args):
            self.calls += 1

        runner.pipe.text_encoder.register_forward_pre_hook(count)

    def during(self, fn) -> int:
        before = self.calls
        fn()
        return self.calls - before


@pytest.fixture(scope="module")
def t2i(tiny_t2i):
    runner = PipelineRunner(resolve_model(str(tiny_t2i)), device="cpu", warm=False)
    return runner, Encodes(runner)


def _pixels(runner: PipelineRunner, job: Job) -> np.ndarray:
    return np.asarray(runner.run(job)[0])


def test_a_prompt_seen_before_skips_the_encoder_and_gives_the_same_image(t2i):
    runner, encodes = t2i
    job = _job("a lighthouse at dusk", negative_prompt="blurry, watermark")
    assert job.true_cfg_scale > 1, "true CFG: the prompt and the negative prompt are encoded"
    first: list[np.ndarray] = []
    assert encodes.during(lambda: first.append(_pixels(runner, job))) == 2
    assert (runner.last_stats["prompt_encodings"], runner.last_stats["prompt_cache_hits"]) == (2, 0)
    again: list[np.ndarray] = []
    assert encodes.during(lambda: again.append(_pixels(runner, job))) == 0
    assert (runner.last_stats["prompt_encodings"], runner.last_stats["prompt_cache_hits"]) == (0, 2)
    assert np.array_equal(first[0], again[0]), "the kept embeddings are the ones the encoder made"
    other = _job("a red barn in snow", negative_prompt="blurry, watermark")
    assert encodes.during(lambda: runner.run(other)) == 1, "only the new prompt; the negative prompt is kept"


def test_variations_share_the_models_cache(t2i):
    runner, encodes = t2i
    runner.run(_job("a teapot", negative_prompt=" "))
    source = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    variation = Job(mode="variation", prompt="a teapot", seeds=[2], width=SIZE, height=SIZE, num_inference_steps=2,
                    images=[source], strength=0.8)  # fmt: skip
    assert encodes.during(lambda: runner.run(variation)) == 0


def test_the_oldest_entry_goes_first_when_the_cache_is_full(tiny_t2i):
    runner = PipelineRunner(resolve_model(str(tiny_t2i)), device="cpu", warm=False)
    encodes = Encodes(runner)
    runner.prompt_cache.max_entries = 2
    no_cfg = {"true_cfg_scale": 1.0}
    for prompt in ("one", "two", "three"):
        runner.run(_job(prompt, **no_cfg))
    assert len(runner.prompt_cache) == 2
    assert encodes.during(lambda: runner.run(_job("three", **no_cfg))) == 0
    assert encodes.during(lambda: runner.run(_job("one", **no_cfg))) == 1, "the least recently used was dropped"


def test_bytes_are_bounded_and_callers_get_copies():
    cache = PromptCache(max_entries=10, max_bytes=4096)
    small = (torch.ones(1, 4, 64), torch.ones(1, 4, dtype=torch.long))  # 1024 + 32 bytes
    cache.put(("a",), small)
    cache.put(("big",), (torch.ones(1, 64, 64),))  # 16 KiB: more than the whole cache, not kept
    assert len(cache) == 1 and cache.get(("big",)) is None
    for key in ("b", "c", "d"):
        cache.put((key,), small)
    assert len(cache) == 3 and cache.get(("a",)) is None, "four entries of 1056 bytes exceed 4096: the oldest went"
    got = cache.get(("d",))
    got[0].zero_()
    assert torch.equal(cache.get(("d",))[0], small[0]), "changing a returned tensor does not change the kept one"


def _edit(prompt: str, images: list[np.ndarray], seed: int = 3, **fields) -> Job:
    return Job(mode="edit", prompt=prompt, seeds=[seed], width=SIZE, height=SIZE, num_inference_steps=2, images=images,
               **fields)  # fmt: skip


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)


def test_edits_keep_a_prompt_with_its_image(tiny_edit):
    """An edit's prompt is encoded with its input image: kept per prompt and image, so that iterating on one image
    encodes only the new prompt and the same edit again encodes nothing; another image is encoded again."""
    runner = PipelineRunner(resolve_model(str(tiny_edit)), device="cpu", warm=False)
    encodes = Encodes(runner)
    source = _picture(1)
    night = _edit("make it night", [source], negative_prompt="blurry")
    assert night.true_cfg_scale > 1
    first: list[np.ndarray] = []
    assert encodes.during(lambda: first.append(_pixels(runner, night))) == 2
    again: list[np.ndarray] = []
    assert encodes.during(lambda: again.append(_pixels(runner, night))) == 0
    assert np.array_equal(first[0], again[0]), "the kept embeddings are the ones the encoder made"
    assert encodes.during(lambda: runner.run(_edit("make it night", [source], seed=9, negative_prompt="blurry"))) == 0
    assert encodes.during(lambda: runner.run(_edit("add snow", [source], negative_prompt="blurry"))) == 1, "the new prompt"
    other = source.copy()
    other[0, 0, 0] ^= 1  # one value of one pixel
    assert encodes.during(lambda: runner.run(_edit("make it night", [other], negative_prompt="blurry"))) == 2


def test_edit_plus_keys_every_image_in_order(tiny_edit_plus):
    runner = PipelineRunner(resolve_model(str(tiny_edit_plus)), device="cpu", warm=False)
    encodes = Encodes(runner)
    a, b = _picture(4), _picture(5)
    no_cfg = {"true_cfg_scale": 1.0}
    assert encodes.during(lambda: runner.run(_edit("put the cat on the sofa", [a, b], **no_cfg))) == 1
    assert encodes.during(lambda: runner.run(_edit("put the cat on the sofa", [a, b], seed=8, **no_cfg))) == 0
    assert encodes.during(lambda: runner.run(_edit("put the cat on the sofa", [b, a], **no_cfg))) == 1, "the order counts"
    assert encodes.during(lambda: runner.run(_edit("put the cat on the sofa", [a], **no_cfg))) == 1


def test_image_keys_tell_pixels_apart_and_leave_other_types_to_the_encoder():
    from PIL import Image

    from qwen_image_server.models.prompt_cache import UNKEYED, image_key

    picture = Image.fromarray(_picture(6))
    same = Image.fromarray(_picture(6))
    assert image_key(picture) == image_key(same) and image_key(None) is None
    assert image_key(picture) != image_key(picture.convert("L")) != image_key(picture.resize((SIZE, SIZE // 2)))
    assert image_key([picture, same]) == image_key([same, picture]) != image_key([picture])
    assert image_key(torch.zeros(1, 3, 8, 8)) is UNKEYED and image_key([picture, torch.zeros(3)]) is UNKEYED


def test_an_edit_reads_its_prompts_first_1024_tokens_and_usage_counts_what_a_model_read(t2i, tiny_edit, tiny_edit_plus):
    """diffusers' edit pipelines cut no prompt: 1400 CJK characters (4200 byte tokens with the tiny tokenizer) and
    the image's tokens passed the transformer's 4096 text positions, and the edit failed inside it (a 500). An edit's
    prompt and negative prompt are cut to their first 1024 tokens: the same image as the cut prompt's. A generation's
    embeddings diffusers cuts at 512 tokens; the tokens counted for ``usage`` are those a model read."""
    runner, _ = t2i
    runner.run(_job("a " * 2000))
    assert runner.last_prompt_tokens == 512
    runner.run(_job("abc"))
    assert runner.last_prompt_tokens == 3
    head = "x" * 1024
    for folder, images in ((tiny_edit, [_picture(1)]), (tiny_edit_plus, [_picture(1), _picture(2)])):
        edit = PipelineRunner(resolve_model(str(folder)), device="cpu", warm=False)
        long = _pixels(edit, _edit(head + "日" * 1400, images, negative_prompt="ugly " * 800))
        assert edit.last_prompt_tokens == 1024
        cut = _pixels(edit, _edit(head, images, negative_prompt=("ugly " * 800)[:1024]))
        assert np.array_equal(long, cut), "the long prompts were read as their first 1024 tokens"
        edit.run(_edit("日" * 1400, images))  # cut within a character: no half character is left at its end
        assert edit.last_prompt_tokens == 1024
