"""Joint decoding with the pre-beam (CTC scores the attention's best 1.5k labels) against CTC scoring every label:
on the test suite's tiny model (trained here on 80 recordings of two speakers), 200 recordings of four speakers.

    MMGEN_DATA_DIR=... PYTHONPATH=. python benchmarks/asr_prebeam_check.py
"""
import os
import tempfile
from pathlib import Path

import mmgen.tasks.speech_recognizer as sr
from mmgen.data.speech import fsdd_utterances
from tests.speech.conftest import fit_asr, manifest, pick

items = fsdd_utterances(Path(os.environ["MMGEN_DATA_DIR"]) / "fsdd/recordings")
root = Path(tempfile.mkdtemp())
train = pick(items, ("jackson", "theo"), range(10, 14))
val = pick(items, ("jackson",), range(5, 6))
_, model = fit_asr(root, manifest(root / "train.jsonl", train), manifest(root / "val.jsonl", val), 300,
                   audio_args={"spec_augment": False}, learning_rate=3e-3, warmup_steps=20, lr_decay_steps=300)
model.eval()
unseen = pick(items, ("george", "lucas", "nicolas", "jackson"), range(0, 5))
test, refs = [u.audio[0] for u in unseen], [u.text for u in unseen]
a = model.transcribe(test, decoding="joint")
sr.PRE_BEAM_RATIO = 1e9
b = model.transcribe(test, decoding="joint")
print(len(test), "files; same transcript:", sum(x == y for x, y in zip(a, b)))
print("errors pre-beam", sum(x != r for x, r in zip(a, refs)), "full", sum(y != r for y, r in zip(b, refs)))
