"""The built-in text plugin's CharTokenizer: vocabulary, encode/decode, unknown characters, state, collate."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from mmgen.modality import TextSpec, VocabularyError
from mmgen_text import CharTokenizer


def fitted(text: str = "hello world", **kwargs) -> CharTokenizer:
    tok = CharTokenizer(**kwargs)
    tok.fit([text])
    return tok


def test_fit_builds_sorted_vocabulary_after_four_reserved_ids():
    tok = CharTokenizer()
    assert not tok.fitted
    tok.fit(["hello", " world"])  # the vocabulary is the union over items
    assert tok.fitted
    assert tok.chars == " dehlorw"
    assert tok.spec == TextSpec(vocab_size=4 + 8, pad_id=0, bos_id=1, eos_id=2, unk_id=3)
    assert tok.encode(" dehlorw").tolist() == list(range(4, 12))  # code-point order from id 4 on


def test_spec_before_fit_and_fit_on_empty_text_are_errors():
    with pytest.raises(RuntimeError, match="no vocabulary"):
        CharTokenizer().spec
    with pytest.raises(VocabularyError, match="empty"):
        CharTokenizer().fit(["", ""])


@pytest.mark.parametrize("text", ["hello world", "héllo wörld ✓ 😀\n\ttab", ""])
def test_encode_decode_round_trip(text):
    tok = fitted(text or "x")
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert bool((ids >= 4).all())
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.render(ids) == text


def test_decode_drops_special_and_out_of_range_ids():
    tok = fitted("ab")
    assert tok.decode([1, 4, 0, 3, 5, 2, 99]) == "ab"


def test_unseen_characters_raise_listing_them():
    tok = fitted("abc")
    with pytest.raises(VocabularyError) as info:
        tok.encode("abxyx é")
    message = str(info.value)
    for ch in ("x", "y", "é", " "):
        assert repr(ch) in message
    assert "'a'" not in message and "'b'" not in message
    assert "4 character(s)" in message
    assert "unknown: unk" in message
    assert isinstance(info.value, ValueError)
    assert tok.unseen("abxyx é") == {"x", "y", "é", " "}


def test_unknown_unk_maps_unseen_characters_to_unk_id():
    tok = fitted("abc", unknown="unk")
    ids = tok.encode("azb😀c")
    assert ids.tolist() == [4, 3, 5, 3, 6]
    assert tok.spec.unk_id == 3
    assert tok.decode(ids) == "abc"  # <unk> is a special id and decodes to nothing


def test_unseen_character_beyond_the_largest_known_code_point():
    # searchsorted lands past the end of the vocabulary for such characters; they must still count as unseen
    tok = fitted("abc", unknown="unk")
    assert tok.encode("c~").tolist() == [6, 3]
    with pytest.raises(VocabularyError, match="'~'"):
        fitted("abc").encode("~")


def test_state_dict_is_plain_json_and_round_trips():
    tok = fitted("héllo wörld ✓", unknown="unk")
    state = json.loads(json.dumps(tok.state_dict()))
    args = json.loads(json.dumps(tok.init_args()))
    assert args == {"unknown": "unk"}
    restored = CharTokenizer(**args)
    restored.load_state_dict(state)
    assert restored.chars == tok.chars
    assert restored.spec == tok.spec
    assert torch.equal(restored.encode("wörld ?"), tok.encode("wörld ?"))


def test_pickle_round_trip():
    tok = fitted("héllo wörld", unknown="unk")
    clone = pickle.loads(pickle.dumps(tok))
    assert isinstance(clone, CharTokenizer)
    assert clone.unknown == "unk" and clone.chars == tok.chars
    assert torch.equal(clone.encode("hé?"), tok.encode("hé?"))


def test_collate_pads_with_pad_id_and_masks_real_tokens():
    tok = fitted("abcdef")
    features = [tok.encode("abc"), tok.encode("a"), tok.encode("fedcb")]
    batch = tok.collate(features)
    pad = tok.spec.pad_id
    assert batch.values.shape == (3, 5) and batch.values.dtype == torch.int64
    assert batch.values.tolist() == [[4, 5, 6, pad, pad], [4, pad, pad, pad, pad], [9, 8, 7, 6, 5]]
    assert batch.mask.dtype == torch.bool
    assert batch.mask.tolist() == [[True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5]
    assert batch.lengths.tolist() == [3, 1, 5]
    assert [tok.decode(row) for row in batch.values] == ["abc", "a", "fedcb"]


def test_bad_unknown_value_lists_accepted_values():
    with pytest.raises(ValueError) as info:
        CharTokenizer(unknown="bogus")
    message = str(info.value)
    assert "'bogus'" in message and "'error'" in message and "'unk'" in message
