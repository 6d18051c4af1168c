import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from drrl.data import get_tokenizer
from drrl.data.tokens import split_for_encoding

ALPHABET = st.sampled_from(["a", "B", " ", "  ", "\n", "\n\n", "\t", ".", "'s", "9", "é", "\r\n", "x\ny"])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(ALPHABET, min_size=1, max_size=300), target=st.integers(1, 40))
def test_pieces_encode_to_the_ids_of_the_whole_text(parts, target):
    text = "".join(parts)
    pieces = split_for_encoding(text, target)
    assert "".join(pieces) == text
    tok = get_tokenizer("gpt2")
    assert list(itertools.chain.from_iterable(tok.encode_batch(pieces))) == tok.encode(text)


def test_long_text_is_cut_near_the_target():
    text = "KING:\nSome words here.\n\n" * 1000
    pieces = split_for_encoding(text, 1000)
    assert len(pieces) > 10 and max(map(len, pieces)) < 1100
