"""The LoRA pairs of the resume matrix (tests/e2e/_resume_pairs.py), run by tools/resume_matrix.sh,
not by the default suite (the file name is not collected): a ZeRO-3 LoRA run resumed at another
data-parallel size through its universal form, the exports (merged model and adapter) compared too
(tests/e2e/_lora_pairs.py)."""

import pytest

from tests.e2e._lora_pairs import lora_layout, resume_pair
from tests.e2e._resume_pairs import run_source

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def lora4(assets, tmp_path_factory):
    return run_source(assets, tmp_path_factory.mktemp("lora4"), lora_layout(4))


def test_lora_4_to_2(assets, lora4, tmp_path):
    resume_pair(assets, lora4, tmp_path, lora_layout(2))
