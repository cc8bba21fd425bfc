"""Sequence names in file and volume names: how swapped inputs are recognised (``anofpdm.inputs``)."""

import pytest

from anofpdm.inputs import check_sequence_name, named_sequences
from anofpdm.volume import InputError


@pytest.mark.parametrize(("name", "named"), [
    ("BraTS2021_00000_flair.nii.gz", {"flair"}),
    ("BraTS2021_00000_t2.nii.gz", {"t2"}),
    ("BraTS2021_00000_t1ce.nii.gz", {"t1ce"}),
    ("BraTS-GLI-00000-000-t2f.nii.gz", {"flair"}),  # BraTS 2023: t2f is the FLAIR, t2w the T2
    ("BraTS-GLI-00000-000-t2w.nii.gz", {"t2"}),
    ("BraTS-GLI-00000-000-t1n.nii.gz", {"t1"}),
    ("AX_T2_FLAIR", {"flair"}),  # a T2-weighted FLAIR is a FLAIR
    ("t2_tirm_tra_dark-fluid", {"flair"}),  # Siemens' FLAIR series
    ("sub-01_T1w.nii.gz", {"t1"}),
    ("t2flair_case", set()),  # one word: not a sequence name
    ("SYN_00000.nii.gz", set()),
    ("tmpk2f9_x1.nii.gz", set()),
])
def test_named_sequences(name, named):
    assert named_sequences(name) == named


def test_a_file_named_as_another_sequence_is_refused():
    check_sequence_name("flair", "BraTS2021_00000_flair.nii.gz")
    check_sequence_name("flair", "SYN_00000.nii.gz")  # no sequence in the name: nothing to judge
    check_sequence_name("t2", "t2.nii.gz")
    with pytest.raises(InputError, match=r"the file given as the FLAIR is named 'case_t2.nii.gz', which says T2: "
                                         r"are the sequences swapped\?"):
        check_sequence_name("flair", "case_t2.nii.gz")
    with pytest.raises(InputError, match=r"the file given as the T2 is named 'AX_T2_FLAIR', which says FLAIR"):
        check_sequence_name("t2", "AX_T2_FLAIR")
