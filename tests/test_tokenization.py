"""The EOS trap: every row must be [BOS] + content + [EOS] whatever the tokenizer itself does."""

import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer

from lowmem_e5.errors import TextTooLongError
from lowmem_e5.runtime.tokenization import pad_rows, tokenize

from .conftest import MIXED_TEXTS


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return AutoTokenizer.from_pretrained(real_model_dir)


def test_tokenizer_own_special_token_policy_is_pinned(tokenizer):
    # Canary: the shipped tokenizer adds neither BOS nor EOS by itself. If a transformers/tokenizers upgrade
    # changes that, this fails and the E5 row shape must be re-checked (the E5 trap went the other way).
    ids = tokenizer("hello world")["input_ids"]
    assert ids == tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_every_row_starts_with_bos_and_ends_with_a_single_eos(tokenizer):
    tok = tokenize(tokenizer, MIXED_TEXTS, max_length=512)
    for text, row in zip(MIXED_TEXTS, tok.rows):
        assert row[0] == tokenizer.bos_token_id
        assert row[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in row[1:-1]
        assert row[1:-1] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_rows_are_the_same_when_the_tokenizer_adds_bos_and_eos_itself(tokenizer, real_model_dir):
    # The E5 repo's tokenizer.json adds BOS only, another version may add BOS and EOS: neither may change our rows.
    for template in ("<|im_start|> $A", "<|im_start|> $A <|im_end|>"):
        other = AutoTokenizer.from_pretrained(real_model_dir)
        other.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)])
        assert other("hi")["input_ids"][0] == 1  # the template really is active
        assert tokenize(other, MIXED_TEXTS, 512).rows == tokenize(tokenizer, MIXED_TEXTS, 512).rows


def test_long_text_is_truncated_keeping_eos_and_counted(tokenizer):
    texts = ["short", "word " * 100]
    tok = tokenize(tokenizer, texts, max_length=16)
    assert tok.truncated == [1]
    assert len(tok.rows[1]) == 16 and tok.rows[1][0] == 1 and tok.rows[1][-1] == 2
    assert len(tok.rows[0]) < 16


def test_no_truncate_refuses_a_long_text_by_index(tokenizer):
    with pytest.raises(TextTooLongError, match=r"text #1 has \d+ tokens .* more than max_length=16"):
        tokenize(tokenizer, ["short", "word " * 100], max_length=16, truncate=False)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_keeps_positions_of_real_tokens(side):
    ids, mask, pos = pad_rows([[1, 5, 2], [1, 5, 6, 7, 2]], pad_id=2, padding_side=side)
    assert ids.shape == mask.shape == pos.shape == (2, 5)
    real_pos = pos[0][mask[0].bool()]
    assert real_pos.tolist() == [0, 1, 2]
    assert ids[0][mask[0].bool()].tolist() == [1, 5, 2]
    assert mask[0].tolist() == ([0, 0, 1, 1, 1] if side == "left" else [1, 1, 1, 0, 0])
    assert torch.equal(pos[1], torch.arange(5))
