"""User-facing errors: one line, whatever raised them."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, Dataset

from van_app.errors import DataError, first_line


class Unreadable(Dataset):
    """A data set whose every item fails, as a folder whose images all went bad does."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise DataError("none of the 3 images can be read any more (first: a/0.png)")


@pytest.mark.slow
def test_error_from_a_data_loader_worker_is_its_own_message():
    with pytest.raises(DataError) as info:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(info.value)
    assert first_line(info.value) == "none of the 3 images can be read any more (first: a/0.png)"


def test_first_line_keeps_only_the_first_line():
    assert first_line(ValueError("bad thing\n  details\n  more")) == "bad thing"


def test_first_line_is_bounded():
    assert len(first_line(ValueError("x" * 10_000))) <= 300


def test_first_line_of_an_empty_message_names_the_error():
    assert first_line(KeyError()) == "KeyError"
