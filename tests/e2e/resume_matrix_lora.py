"""The LoRA pairs of the resume matrix (tests/e2e/_resume_pairs.py), run by tools/resume_matrix.sh,
not by the default suite (the file name is not collected): a ZeRO-3 LoRA run resumed at another
data-parallel size through its universal form, the exports (merged model and adapter) compared too
(tests/e2e/_lora_pairs.py)."""

import pytest

from tests.e2e._lora_pairs import lora_layout, lora_source, resume_pair

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def test_lora_4_to_2(assets, tmp_path_factory, tmp_path):
    resume_pair(assets, lora_source(assets, tmp_path_factory, 4), tmp_path, lora_layout(2))
