"""The speech recogniser: joint loss, KV-cache decoding, beam search, batch independence, training on real speech,
checkpoints, fine-tuning and the transcribe command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import mmgen
from mmgen.beam_search import BeamSearch
from mmgen.checkpoint import CheckpointError
from mmgen.data.speech import connected_digits
from mmgen.tasks import SpeechRecognizer
from mmgen_text import CharTokenizer

from tests.speech.conftest import TINY_ASR, audio, fit_asr, manifest, pick


def tiny(**overrides) -> SpeechRecognizer:
    text = CharTokenizer()
    text.fit(["zero one two three four five six seven eight nine"])
    torch.manual_seed(0)
    return SpeechRecognizer({"source": audio(), "target": text}, **{**TINY_ASR, **overrides})


@pytest.fixture(scope="module")
def trained(fsdd_items, tmp_path_factory) -> tuple[SpeechRecognizer, Path, list]:
    """A tiny recogniser trained on 40 real recordings (two speakers, every digit) until it knows them (without
    SpecAugment, which slows memorising)."""
    root = tmp_path_factory.mktemp("asr")
    train = pick(fsdd_items, ("jackson", "theo"), range(10, 12))
    val = pick(fsdd_items, ("jackson",), range(5, 6))
    _, model = fit_asr(root, manifest(root / "train.jsonl", train), manifest(root / "val.jsonl", val), 360,
                       audio_args={"spec_augment": False}, learning_rate=3e-3, warmup_steps=20, lr_decay_steps=360)
    return model.eval(), root / "last.ckpt", train


def test_joint_loss_is_the_weighted_sum_of_ctc_and_attention() -> None:
    model = tiny(ctc_weight=0.3, label_smoothing=0.0).eval()
    feats = [torch.randn(60, 40), torch.randn(45, 40)]
    texts = ["three", "one"]
    batch = {"source": model.source.collate(feats),
             "target": model.target.collate([model.target.encode(t) for t in texts]), "text": texts}
    losses = model._losses(batch)
    memory, mask = model.net.encode(batch["source"].values, batch["source"].mask)
    lp = model.net.ctc_head(memory).log_softmax(-1)
    ctc = sum(F.ctc_loss(lp[i, :int(mask[i].sum())], model.target.encode(t), [int(mask[i].sum())], [len(t)],
                         blank=0, reduction="sum") for i, t in enumerate(texts)) / 2
    spec = model.target.spec
    att = 0.0
    for i, t in enumerate(texts):
        ids = model.target.encode(t)
        logits = model.net.decode(torch.cat([torch.tensor([spec.bos_id]), ids])[None], memory[i:i + 1, :int(mask[i].sum())],
                                  None)[0]
        att += F.cross_entropy(logits, torch.cat([ids, torch.tensor([spec.eos_id])]), reduction="sum")
    att = att / 2
    torch.testing.assert_close(losses["ctc"], ctc, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(losses["att"], att, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(losses["loss"], 0.3 * ctc + 0.7 * att, atol=1e-4, rtol=1e-5)


def test_decoder_kv_cache_matches_full_forward() -> None:
    model = tiny().eval()
    feats = model.source.collate([torch.randn(50, 40), torch.randn(33, 40)])
    memory, mask = model.net.encode(feats.values, feats.mask)
    ids = torch.randint(4, model.target.spec.vocab_size, (2, 9))
    full = model.net.decode(ids, memory, mask)
    cache = model.net.decoder.make_cache(2, 9, memory=memory, memory_mask=mask)
    steps = torch.cat([model.net.decode(ids[:, i:i + 1], None, None, cache) for i in range(9)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    # After a reorder (beam search), row i continues old row index[i].
    cache = model.net.decoder.make_cache(2, 9, memory=memory, memory_mask=mask)
    model.net.decode(ids[:, :4], None, None, cache)
    cache.reorder(torch.tensor([1, 1]))
    swapped = model.net.decode(ids[[1, 1], 4:], None, None, cache)
    torch.testing.assert_close(swapped, full[[1, 1], 4:], atol=1e-5, rtol=1e-5)


def test_beam_of_one_is_greedy_attention_decoding(trained) -> None:
    model, _, train = trained
    feats = model.source.collate([model.source.encode(u.audio[0]) for u in train[:6]])
    memory, mask = model.net.encode(feats.values, feats.mask)
    spec = model.target.spec
    greedy = []
    for i in range(6):  # argmax decoding by full forward passes, no cache
        ids = torch.tensor([[spec.bos_id]])
        for _ in range(20):
            logits = model.net.decode(ids, memory[i:i + 1], mask[i:i + 1])[0, -1]
            logits[[spec.pad_id, spec.bos_id]] = -torch.inf
            nxt = int(logits.argmax())
            if nxt == spec.eos_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        greedy.append(model.target.decode(ids[0, 1:]))
    model.hparams.ctc_rescore_weight = 0.0
    try:
        assert model.recognize(feats, "attention", beam_size=1) == greedy
    finally:
        model.hparams.ctc_rescore_weight = TINY_ASR.get("ctc_rescore_weight", 0.3)


@torch.inference_mode()
def test_joint_search_finds_the_ctc_optimum_and_scores_like_rescoring(trained) -> None:
    """With all weight on CTC, the joint search over every label is CTC's exact best sequence (by enumeration of the
    alignments); at any weight, a finished hypothesis's score is ``(1 - λ) log p_att + λ log p_ctc``."""
    import math

    from tests.speech.test_ctc import exact_label_probs

    model, _, train = trained
    spec = model.target.spec
    feats = model.source.collate([model.source.encode(train[0].audio[0])])
    memory, mask = model.net.encode(feats.values, feats.mask)
    # A 4-frame CTC distribution over blank and two letters, everything else impossible.
    letters = model.target.encode("eo").tolist()
    torch.manual_seed(0)
    small = torch.randn(4, 3).mul(2).log_softmax(-1)
    lp = torch.full((1, 4, spec.vocab_size), -math.inf)
    lp[0, :, [model.blank_id, *letters]] = small
    exact = exact_label_probs(small.double(), blank=0)
    best = max(exact, key=exact.get)
    lam = model.hparams.ctc_rescore_weight
    try:
        model.hparams.ctc_rescore_weight = 1.0
        found = model._attention_beam_search(memory[:, :4], mask[:, :4], lp, k=16, joint=True)[0]
        assert found == [letters[i - 1] for i in best]
    finally:
        model.hparams.ctc_rescore_weight = lam
    # Scores: each finished hypothesis of the joint search, scored by hand from full forward passes.
    lp = model.net.ctc_head(memory).log_softmax(-1)
    nbest = model._nbest(memory, mask, lp, k=3, joint=True)[0]
    assert len(nbest) >= 2
    for hyp, score in nbest:
        ids = torch.tensor([spec.bos_id, *hyp])[None]
        att = float(model.net.decode(ids, memory, mask)[0].log_softmax(-1)
                    .gather(1, torch.tensor([*hyp, spec.eos_id])[:, None]).sum())
        ctc = -float(F.ctc_loss(lp[0], torch.tensor(hyp), [lp.shape[1]], [len(hyp)], blank=model.blank_id,
                                reduction="sum"))
        assert math.isclose(score, (1 - lam) * att + lam * ctc, rel_tol=1e-4, abs_tol=1e-3), (hyp, score, att, ctc)


def test_learns_real_recordings_with_every_decoder(trained) -> None:
    model, _, train = trained
    paths = [u.audio[0] for u in train]
    refs = [u.text for u in train]
    for decoding in ("ctc_greedy", "ctc_beam", "attention", "joint"):
        hyps = model.transcribe(paths, decoding=decoding)
        right = sum(h == r for h, r in zip(hyps, refs))
        assert right >= 0.9 * len(refs), (decoding, list(zip(refs, hyps)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchaudio's CUDA CTC decoder needs a GPU: run on the GPU "
                    "machine (docs/benchmarks.md)")
def test_cuda_ctc_beam_search_matches_the_cpu_search(trained) -> None:
    model, _, train = trained
    paths = [u.audio[0] for u in train]
    cpu = model.transcribe(paths, decoding="ctc_beam")
    model.cuda()
    try:
        gpu = model.transcribe(paths, decoding="ctc_beam")
        assert model._decoders  # the CUDA decoder ran
    finally:
        model.cpu()
    assert gpu == cpu


def every_nbest(model: SpeechRecognizer, feats, **run) -> list:
    """The n-best lists of every attention search (attention, joint; free spelling and a lexicon), with ``run``
    passed to :meth:`BeamSearch.run`."""
    out = []
    memory, mask = model.net.encode(feats.values.to(model.device), feats.mask.to(model.device))
    lp = model.net.ctc_head(memory).float().log_softmax(-1)
    original = BeamSearch.run
    try:
        BeamSearch.run = lambda self, graph=None, **kw: original(self, **{"graph": graph, **kw, **run})
        for lexicon in (None, ["zero", "one", "two", "three", "four"]):
            model.hparams.lexicon = lexicon
            for joint in (False, True):
                out.append(model._nbest(memory, mask, lp, 3, joint))
    finally:
        BeamSearch.run = original
        model.hparams.lexicon = None
    return out


def assert_same_nbest(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        assert [[h for h, _ in u] for u in g] == [[h for h, _ in u] for u in w]
        torch.testing.assert_close(torch.tensor([s for u in g for _, s in u], dtype=torch.float64),
                                   torch.tensor([s for u in w for _, s in u], dtype=torch.float64), atol=1e-4,
                                   rtol=1e-5)


@torch.inference_mode()
def test_fixed_shape_search_steps_equal_eager_steps(trained, fsdd_items) -> None:
    """The search's fixed-shape step (attention over the whole cache under a mask, whole-buffer reorders: what a CUDA
    graph replays) gives the eager step's n-best and scores, for a trained model whose hypotheses end and for an
    untrained one whose never do (they run to the length limit and compete as they stand)."""
    model, _, _ = trained
    files = [u.audio[0] for u in pick(fsdd_items, ("lucas", "jackson"), range(20, 22), digits=(0, 3, 7))]
    feats = model.source.collate([model.source.encode(f) for f in files])
    assert_same_nbest(every_nbest(model, feats, fixed_shapes=True), every_nbest(model, feats))
    untrained = tiny(max_target_length=12).eval()
    nbest = every_nbest(untrained, feats, fixed_shapes=True)
    assert any(len(h) == 12 for lists in nbest for utterance in lists for h, _ in utterance)
    assert_same_nbest(nbest, every_nbest(untrained, feats))


def test_attention_searches_run_under_bf16_autocast(trained) -> None:
    """Validation in a bf16-mixed run decodes under autocast: the step cache takes the autocast dtype, and the trained
    model still spells its training words."""
    model, _, train = trained
    paths = [u.audio[0] for u in train[:8]]
    for decoding in ("attention", "joint"):
        plain = model.transcribe(paths, decoding=decoding)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.transcribe(paths, decoding=decoding)
        assert mixed == plain, decoding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run on the GPU machine "
                    "(docs/benchmarks.md)")
def test_cuda_graph_search_equals_eager_search_and_the_cpu(trained, fsdd_items) -> None:
    model, _, _ = trained
    files = [u.audio[0] for u in pick(fsdd_items, ("lucas", "jackson"), range(20, 22), digits=(0, 3, 7))]
    with torch.inference_mode():
        feats = model.source.collate([model.source.encode(f) for f in files])
        cpu = every_nbest(model, feats)
    cpu_text = {d: model.transcribe(files, decoding=d) for d in ("attention", "joint")}
    model.cuda()  # outside inference mode: moved there, the parameters would become inference tensors for good
    try:
        with torch.inference_mode():
            graphed = every_nbest(model, feats, graph=True)
            assert_same_nbest(graphed, every_nbest(model, feats, graph=False))
            assert_same_nbest(graphed, cpu)
        assert {d: model.transcribe(files, decoding=d) for d in ("attention", "joint")} == cpu_text
        with torch.autocast("cuda", dtype=torch.bfloat16):  # a bf16-mixed run's validation, captured as well
            assert {d: model.transcribe(files, decoding=d) for d in ("attention", "joint")} == cpu_text
    finally:
        model.cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run on the GPU machine "
                    "(docs/benchmarks.md)")
def test_encoder_graphs_equal_the_eager_encoder(trained, fsdd_items) -> None:
    model, _, _ = trained
    files = [u.audio[0] for u in pick(fsdd_items, ("lucas", "jackson"), range(20, 22), digits=(0, 3, 7))]
    feats = [model.source.encode(f) for f in files]
    eager_text = {d: model.transcribe(files, decoding=d) for d in ("ctc_greedy", "joint")}
    model._encoder_graphs = None  # other tests' graphs: count this test's captures from zero
    model.cuda()
    try:
        batch = model.source.collate(feats)
        values, mask = batch.values.cuda(), batch.mask.cuda()

        def encode(graph: bool, v: Tensor = values, m: Tensor = mask) -> list[Tensor]:
            model.graph_encoding = graph
            with torch.inference_mode():
                return [t.clone() for t in model._encode_for_decoding(v, m)]

        def assert_same(graphed: list[Tensor], eager: list[Tensor]) -> None:
            assert [t.shape for t in graphed] == [t.shape for t in eager]
            assert torch.equal(graphed[1], eager[1])  # the masks
            torch.testing.assert_close(graphed[0], eager[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(graphed[2], eager[2], atol=1e-4, rtol=1e-4)

        eager = encode(False)
        assert_same(encode(True), eager)
        assert_same(encode(True), eager)  # replayed, not captured again
        assert model._encoder_graphs.captures == 1
        n = int(mask[0].sum())
        assert_same(encode(True, values[:1, :n], mask[:1, :n]), encode(False, values[:1, :n], mask[:1, :n]))
        assert model._encoder_graphs.captures == 2  # a new (batch, length bucket)
        held = [p.data for p in model.parameters()]  # so that the weights cannot come back to the same addresses
        model.cpu()
        model.cuda()  # the weights moved: the graphs are captured again
        del held
        assert_same(encode(True), eager)
        assert model._encoder_graphs.captures == 3
        assert {d: model.transcribe(files, decoding=d) for d in eager_text} == eager_text
    finally:
        model.graph_encoding = True
        model.cpu()


def test_same_transcript_alone_and_in_a_padded_batch(trained, fsdd_items) -> None:
    model, _, _ = trained
    files = [u.audio[0] for u in pick(fsdd_items, ("lucas", "jackson"), range(20, 22), digits=(0, 3, 7))]
    feats = [model.source.encode(f) for f in files]
    assert len({len(f) for f in feats}) > 3  # lengths differ: the batch is padded
    batch = model.source.collate(feats)
    memory, mask = model.net.encode(batch.values, batch.mask)
    for decoding in ("ctc_greedy", "ctc_beam", "attention", "joint"):
        together = model.recognize(batch, decoding)
        alone = [model.recognize(model.source.collate([f]), decoding)[0] for f in feats]
        assert together == alone, decoding
    for i, f in enumerate(feats):
        one, m = model.net.encode(f[None], torch.ones(1, len(f), dtype=torch.bool))
        torch.testing.assert_close(memory[i, :m.shape[1]], one[0], atol=1e-4, rtol=1e-4)


def test_checkpoint_round_trip_and_python_one_liner(trained) -> None:
    model, ckpt, train = trained
    loaded = mmgen.load(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, saved[name]), name
    paths = [u.audio[0] for u in train[:8]]
    assert mmgen.load(ckpt).transcribe(paths) == model.transcribe(paths)
    record = torch.load(ckpt, weights_only=True)["mmgen"]["modalities"]
    assert record["source"]["name"] == "LogMelFrames" and record["source"]["plugin"] == "audio"
    assert record["target"]["state"]["chars"] == model.target.chars


def test_transcribe_command(trained, tmp_path) -> None:
    model, ckpt, train = trained
    paths = [u.audio[0] for u in train[:3]]
    out = subprocess.run([sys.executable, "-m", "mmgen", "transcribe", "--ckpt", str(ckpt), *paths,
                          "--decoding", "ctc_greedy"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines == [f"{p}\t{t}" for p, t in zip(paths, model.transcribe(paths, decoding="ctc_greedy"))]
    assert "real-time factor" in out.stderr
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    out = subprocess.run([sys.executable, "-m", "mmgen", "transcribe", "--ckpt", str(ckpt), str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and str(bad) in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_fine_tune_with_init_from(trained, fsdd_items, tmp_path) -> None:
    model, ckpt, _ = trained
    train = manifest(tmp_path / "t.jsonl", pick(fsdd_items, ("nicolas",), range(10, 12)))
    val = manifest(tmp_path / "v.jsonl", pick(fsdd_items, ("nicolas",), range(5, 6)))
    _, tuned = fit_asr(tmp_path, train, val, 0, init_from=str(ckpt), audio_args={"spec_augment": False})
    for name, value in model.state_dict().items():  # zero steps: the checkpoint's weights exactly
        assert torch.equal(tuned.state_dict()[name], value), name
    assert tuned.target.chars == model.target.chars
    with pytest.raises(CheckpointError, match="audio features"):
        text = CharTokenizer()
        text.fit(["one"])
        SpeechRecognizer({"source": audio(n_mels=64), "target": text}, **TINY_ASR, init_from=str(ckpt))


def test_connected_digits_are_spelled_word_by_word(fsdd_items) -> None:
    seqs = connected_digits(pick(fsdd_items, ("theo",), range(10, 20)), 20, (2, 7), 0.1, seed=3)
    assert seqs == connected_digits(pick(fsdd_items, ("theo",), range(10, 20)), 20, (2, 7), 0.1, seed=3)
    for s in seqs:
        words = s.text.split()
        assert 2 <= len(words) == len(s.audio) <= 7
        assert [Path(a).stem.split("_")[0] for a in s.audio] == [str(("zero", "one", "two", "three", "four", "five",
                                                                       "six", "seven", "eight", "nine").index(w))
                                                                  for w in words]


def test_every_epoch_draws_a_new_batch_order(fsdd_items, tmp_path, monkeypatch) -> None:
    """Lightning tells the length-bucketed batch sampler each epoch (through ``batch_sampler.sampler.set_epoch``),
    so batches are reshuffled every epoch, reproducibly."""
    from mmgen.data import speech

    seen: list[tuple[int, list[list[int]]]] = []
    real_iter = speech.DurationBatchSampler.__iter__

    def spy(self):
        seen.append((self.epoch, self._batches()))
        return real_iter(self)

    monkeypatch.setattr(speech.DurationBatchSampler, "__iter__", spy)
    train = manifest(tmp_path / "t.jsonl", pick(fsdd_items, ("theo",), range(10, 12)))
    val = manifest(tmp_path / "v.jsonl", pick(fsdd_items, ("theo",), range(5, 6)))
    fit_asr(tmp_path, train, val, 6, audio_args={"spec_augment": False})
    epochs = [e for e, _ in seen]
    assert epochs == list(range(len(epochs))) and len(epochs) >= 2
    assert seen[0][1] != seen[1][1]


def test_lexicon_trie_allows_only_known_words() -> None:
    model = tiny(lexicon=["one", "on", "nine"])
    allowed, step = model._lexicon_trie(torch.device("cpu"))
    spec, enc = model.target.spec, lambda c: int(model.target.encode(c)[0])  # noqa: E731
    ids = lambda row: {i for i in range(spec.vocab_size) if allowed[row, i]}  # noqa: E731
    assert ids(0) == {enc("o"), enc("n")}  # a word starts with a word's first letter: no space, no <eos>
    o = int(step[0, enc("o")])
    assert ids(o) == {enc("n")}
    on = int(step[o, enc("n")])
    assert ids(on) == {enc("e"), enc(" "), spec.eos_id}  # "on" is a word, and the start of "one"
    one = int(step[on, enc("e")])
    assert ids(one) == {enc(" "), spec.eos_id} and int(step[one, enc(" ")]) == 0  # a space starts the next word
    with pytest.raises(ValueError, match="lexicon word 'één' cannot be spelled"):
        tiny(lexicon=["één"])._lexicon_trie(torch.device("cpu"))
    with pytest.raises(ValueError, match="accepted: 'train', a list of words"):
        tiny(lexicon="words.txt")


@pytest.mark.parametrize("decoding", ["attention", "joint"])
def test_lexicon_constrains_attention_beam_search(trained, decoding) -> None:
    model, _, train = trained
    paths = [u.audio[0] for u in train]
    free = model.transcribe(paths, decoding=decoding)
    model.hparams.lexicon = ["zero", "one"]
    try:
        forced = model.transcribe(paths, decoding=decoding)
        model.hparams.lexicon = sorted({u.text for u in train})
        known = model.transcribe(paths, decoding=decoding)
    finally:
        model.hparams.lexicon = None
    assert set(forced) <= {"zero", "one"} and set(forced) == {"zero", "one"}
    assert all(h == u.text for h, u in zip(forced, train) if u.text in ("zero", "one"))
    lexicon = {u.text for u in train}
    assert set(known) <= lexicon
    assert all(k == f for k, f in zip(known, free) if f in lexicon)  # a word it spells right stays right


def test_lexicon_from_training_transcripts_travels_with_the_checkpoint(fsdd_items, tmp_path) -> None:
    train = pick(fsdd_items, ("theo",), range(10, 11))
    _, model = fit_asr(tmp_path, manifest(tmp_path / "train.jsonl", train), manifest(tmp_path / "val.jsonl", train),
                       2, lexicon="train")
    words = sorted({u.text for u in train})
    assert model.hparams.lexicon == words
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["hyper_parameters"]["lexicon"] == words
    loaded = mmgen.load(tmp_path / "last.ckpt")
    assert loaded.hparams.lexicon == words
    assert set(loaded.transcribe([u.audio[0] for u in train[:3]])) <= set(words)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run on the GPU machine "
                    "(docs/benchmarks.md)")
def test_captured_searches_are_reused_for_inputs_of_the_same_shape(trained, fsdd_items) -> None:
    """A GPU search of a shape seen before replays its captured step over its refilled decoder cache and CTC scorer:
    two batches of one shape, each searched after the other has been, give the n-best lists and scores of fresh
    searches; a different shape or new weights capture anew."""
    model, _, _ = trained
    units = pick(fsdd_items, ("lucas", "jackson"), range(20, 22), digits=(0, 3, 7))
    feats = [model.source.encode(u.audio[0]) for u in units]
    frames = min(len(f) for f in feats)
    half = len(feats) // 2
    model.cuda()
    try:
        with torch.inference_mode():
            inputs = []
            for part in (feats[:half], feats[half:2 * half]):  # same shape, other recordings
                batch = model.source.collate([f[:frames] for f in part])
                memory, mask = model.net.encode(batch.values.cuda(), batch.mask.cuda())
                inputs.append((memory, mask, model.net.ctc_head(memory).float().log_softmax(-1)))
            for joint in (False, True):
                fresh = []
                for memory, mask, lp in inputs:
                    model._searches.clear()
                    fresh.append(model._nbest(memory, mask, lp, 3, joint))
                assert len(model._searches) == 1
                for _ in range(2):  # each batch after the other: the kept search refilled
                    for (memory, mask, lp), want in zip(inputs, fresh):
                        assert_same_nbest([model._nbest(memory, mask, lp, 3, joint)], [want])
                        assert len(model._searches) == 1
            memory, mask, lp = inputs[0]
            model._nbest(memory[:, :-4], mask[:, :-4], lp[:, :-4], 3, True)  # a new shape: a second search kept
            assert len(model._searches) == 2
        with torch.no_grad():
            model.net.decoder.norm.weight.mul_(1.0)  # an in-place change: the weights' version moves
        with torch.inference_mode():
            model._nbest(memory, mask, lp, 3, True)
        assert len(model._searches) == 3
    finally:
        model._searches.clear()
        model.cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run on the GPU machine "
                    "(docs/benchmarks.md)")
def test_captures_survive_a_thread_that_pins_memory(trained, fsdd_items) -> None:
    """A DataLoader's pin-memory thread allocates and frees pinned host memory while validation captures a search;
    under PyTorch's default ("global") capture mode that invalidated the capture."""
    import threading

    model, _, _ = trained
    files = [u.audio[0] for u in pick(fsdd_items, ("lucas", "jackson", "theo"), range(20, 24), digits=(0, 3, 7))]
    with torch.inference_mode():
        want = model.transcribe(files, decoding="joint")
    errors: list[BaseException] = []
    stop = threading.Event()

    def pin() -> None:
        size = 1
        while not stop.is_set():
            try:
                torch.empty(1024 * size, pin_memory=True)
                torch._C._host_emptyCache()  # frees the block, so the next allocation is a new cudaHostAlloc
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            size = size % 64 + 1

    thread = threading.Thread(target=pin, daemon=True)
    model.cuda()
    thread.start()
    try:
        with torch.inference_mode():
            for batch_size in (1, 2, 3, 5, 7, 9, 11, 13):  # a new shape each time: fresh encoder and search captures
                model._searches.clear()
                got = model.transcribe(files, decoding="joint", batch_size=batch_size)
                assert got == want
    finally:
        stop.set()
        thread.join()
        model.cpu()
    assert not errors, errors



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run on the GPU machine "
                    "(docs/benchmarks.md)")
def test_the_garbage_collector_waits_while_a_search_is_captured(trained, fsdd_items, monkeypatch) -> None:
    """A search dropped from the reuse cache lives in a reference cycle until the garbage collector frees it, CUDA
    graph and events included, which a capture forbids: the collector must not run inside one."""
    import gc

    from mmgen.beam_search import BeamSearch

    model, _, _ = trained
    files = [u.audio[0] for u in pick(fsdd_items, ("lucas", "jackson"), range(20, 22), digits=(0, 3, 7))]
    with torch.inference_mode():
        want = model.transcribe(files, decoding="joint")
    seen: list[bool] = []
    step = BeamSearch.step

    def spy(self, *args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            seen.append(gc.isenabled())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(BeamSearch, "step", spy)
    model._searches.clear()  # a capture, not a reuse
    model.cuda()
    try:
        with torch.inference_mode():
            assert model.transcribe(files, decoding="joint", batch_size=len(files)) == want
    finally:
        model.cpu()
    assert seen == [False] and gc.isenabled()
