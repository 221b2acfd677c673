"""Pre-tokenized fine-tuning records: accepted as they are, rejected clearly when malformed."""

import numpy as np
import pytest

from loqjax.jobs import DatasetError, TokenRecord, load_records, tokenize


def test_token_records_train_on_their_ids_from_prompt_len():
    records = load_records([{"token_ids": [5, 6, 7, 8], "prompt_len": 2}, {"token_ids": [9]}])
    assert records == [TokenRecord((5, 6, 7, 8), 2), TokenRecord((9,), 0)]
    examples = tokenize(records, tokenizer=None)
    np.testing.assert_array_equal(examples[0].tokens, [5, 6, 7, 8])
    assert examples[0].sequence(slot=1).loss_mask.tolist() == [False, False, True, True]


@pytest.mark.parametrize(
    "record, match",
    [
        ({"token_ids": []}, "non-empty list of integers"),
        ({"token_ids": [1, -2]}, "non-empty list of integers"),
        ({"token_ids": [2**31]}, r"in \[0, 2\*\*31\)"),
        ({"token_ids": [1, True]}, "non-empty list of integers"),
        ({"token_ids": "12"}, "non-empty list of integers"),
        ({"token_ids": [1, 2], "prompt_len": 2}, r"prompt_len must be an integer in \[0, 2\)"),
        ({"token_ids": [1, 2], "prompt_len": -1}, "prompt_len"),
    ],
)
def test_malformed_token_records_name_the_record(record, match):
    with pytest.raises(DatasetError, match=rf"record 1: .*{match}"):
        load_records([{"token_ids": [1]}, record])


def test_text_records_need_a_tokenizer():
    with pytest.raises(DatasetError, match="need a tokenizer"):
        tokenize(load_records([{"prompt": "a", "completion": "b"}]), tokenizer=None)
