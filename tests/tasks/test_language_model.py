"""The GPT task: nanoGPT's schedule and optimiser groups, cached decoding, sampling, and that training learns."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from mmgen.sampling import sample_next
from mmgen.tasks.language_model import cosine_schedule
from mmgen_text import CharTokenizer
from tests.conftest import VERSE, fit, tiny_model


@pytest.fixture
def text() -> CharTokenizer:
    tok = CharTokenizer()
    tok.fit([VERSE])
    return tok


def test_cosine_schedule_matches_nanogpt_formula() -> None:
    kw = dict(warmup_steps=100, decay_steps=5000, min_ratio=0.1)
    assert cosine_schedule(0, **kw) == pytest.approx(1 / 101)
    assert cosine_schedule(99, **kw) == pytest.approx(100 / 101)
    assert cosine_schedule(100, **kw) == pytest.approx(1.0)
    assert cosine_schedule(2550, **kw) == pytest.approx(0.1 + 0.5 * 0.9)  # halfway through the decay
    assert cosine_schedule(5000, **kw) == pytest.approx(0.1)
    assert cosine_schedule(9000, **kw) == 0.1


def test_optimizer_decays_only_matrices(text: CharTokenizer) -> None:
    model = tiny_model(text, weight_decay=0.1, betas=(0.9, 0.99))
    model.trainer = L.Trainer(accelerator="cpu", logger=False)
    conf = model.configure_optimizers()
    opt = conf["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.99)
    # No biases anywhere, and the LM head shares the embedding matrix.
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert model.net.head.proj.weight is model.net.embed.embedding.weight


def test_cached_decoding_equals_full_forward(text: CharTokenizer) -> None:
    torch.manual_seed(0)
    net = tiny_model(text).net.eval()
    ids = torch.randint(4, text.spec.vocab_size, (2, 12))
    full = net(ids)
    cache = net.stack.make_cache(2, 16)
    pieces = [net(ids[:, :5], cache)] + [net(ids[:, i:i + 1], cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_generate_with_and_without_cache_agree_and_stream(text: CharTokenizer) -> None:
    torch.manual_seed(0)
    model = tiny_model(text).eval()
    pieces: list[str] = []
    cached = model.generate("Thou", 40, temperature=0, stream=pieces.append)  # runs past block_size (16)
    assert len(cached) == 40
    assert "".join(pieces) == cached and len(pieces) == 40
    # Until the context (16) is full, both paths see the same tokens, so greedy choices agree.
    assert model.generate("Thou", 12, temperature=0, use_cache=False) == cached[:12]
    a = model.generate("Thou", 30, temperature=1.0, top_k=5, seed=3)
    assert a == model.generate("Thou", 30, temperature=1.0, top_k=5, seed=3)
    assert model.generate("Thou", 20, top_k=1, seed=1) == cached[:20]  # top-1 sampling is greedy


def test_sample_next_restrictions() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0).eq(1).all()
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {1, 2}
    # The two most likely tokens hold p(1)+p(2) ~ 0.91 of the mass: top_p=0.8 keeps exactly those two.
    probs = logits[0].softmax(-1)
    assert probs[1] < 0.8 < probs[1] + probs[2]
    assert set(sample_next(logits, top_p=0.8, generator=g).tolist()) == {1, 2}
    assert sample_next(logits, top_p=0.01, generator=g).eq(1).all()
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1)


def test_training_lowers_validation_loss(tmp_path, corpus) -> None:
    trainer, model, dm = fit(tmp_path, corpus, 0)
    trainer.validate(model, datamodule=dm, verbose=False)
    before = trainer.callback_metrics["val_loss"].item()
    assert before == pytest.approx(math.log(model.text.spec.vocab_size), rel=0.1)  # untrained: near uniform
    trainer, model, dm = fit(tmp_path, corpus, 60, learning_rate=3e-3, lr_decay_steps=60)
    after = trainer.callback_metrics["val_loss"].item()
    assert after < before - 0.8, (before, after)


def test_test_step_logs_test_loss_on_the_validation_windows(tmp_path, corpus) -> None:
    trainer, model, dm = fit(tmp_path, corpus, 3)
    val = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    test = trainer.test(model, datamodule=dm, verbose=False)[0]["test_loss"]
    assert test == val  # the same fixed, seeded windows of the validation split
    assert [torch.equal(a[0], b[0]) for a, b in zip(dm.test_dataloader(), dm.val_dataloader())] == [True, True]
