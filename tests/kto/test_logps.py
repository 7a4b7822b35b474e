"""sequence_logps: a hand-worked tiny case and a cross-entropy reference on padded batches."""

import math

import pytest
import torch
import torch.nn.functional as F

from megakto.kto import sequence_logps


def _ce_reference(logits, input_ids, completion_mask):
    """-cross_entropy per shifted position, summed over completion tokens (fp64)."""
    b, t, v = logits.shape
    nll = F.cross_entropy(
        logits[:, :-1].double().reshape(-1, v), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(b, t - 1)
    mask = completion_mask[:, 1:].bool()
    return -(nll * mask).sum(-1), mask.sum(-1)


def test_hand_worked_v2():
    """V=2, T=3, input_ids = [0, 1, 0].

    logits[0] = [0, 0]      -> log_softmax = [-ln 2, -ln 2]       predicts input_ids[1] = 1: -ln 2
    logits[1] = [ln 3, 0]   -> softmax [3/4, 1/4]                  predicts input_ids[2] = 0: ln 3/4
    logits[2]               -> predicts nothing (no token after it)
    completion_mask [0, 1, 1]: -ln 2 + ln 3/4 = ln 3/8 = -0.980829, 2 tokens
    completion_mask [0, 0, 1]:         ln 3/4        = -0.287682, 1 token
    completion_mask [1, 1, 1]: position 0 has no context and is not scored -> same as [0, 1, 1]
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]]]).repeat(3, 1, 1)
    input_ids = torch.tensor([[0, 1, 0]]).repeat(3, 1)
    mask = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1]])
    logps, n = sequence_logps(logits, input_ids, mask)
    torch.testing.assert_close(logps, torch.tensor([-0.980829, -0.287682, -0.980829]))
    assert math.log(3 / 8) == pytest.approx(-0.980829, abs=1e-6)
    assert n.tolist() == [2, 1, 2]
    assert logps.dtype == torch.float32 and n.dtype == torch.int64


def test_hand_worked_v3():
    """V=3, logits [1, 2, 3]: logsumexp = 3 + ln(1 + e^-1 + e^-2) = 3.407606; token 0 scores
    1 - 3.407606 = -2.407606, token 2 scores 3 - 3.407606 = -0.407606.
    ids [1, 0, 2] with mask [0, 1, 1]: -2.407606 + -0.407606 = -2.815212."""
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    logps, n = sequence_logps(logits, torch.tensor([[1, 0, 2]]), torch.tensor([[0, 1, 1]]))
    assert logps.item() == pytest.approx(-2.815212, abs=1e-5)
    assert n.item() == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_cross_entropy_with_prompts_and_padding(seed):
    """B=5 rows with prompt lengths 1, 2, 4, 7, 3 and right padding, T=12, V=37."""
    gen = torch.Generator().manual_seed(seed)
    b, t, v = 5, 12, 37
    logits = 4 * torch.randn(b, t, v, generator=gen)
    input_ids = torch.randint(0, v, (b, t), generator=gen)
    prompt_len = [1, 2, 4, 7, 3]
    seq_len = [12, 9, 10, 8, 4]
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompt_len, seq_len)):
        mask[i, p:s] = True
        input_ids[i, s:] = 0  # padding id
    logps, n = sequence_logps(logits, input_ids, mask)
    ref_logps, ref_n = _ce_reference(logits, input_ids, mask)
    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-6, atol=1e-4)
    assert n.tolist() == ref_n.tolist() == [11, 7, 6, 1, 1]


def test_pad_ids_and_minus_inf_outside_the_mask_are_harmless():
    """Masked positions may hold -100 labels and -inf logits; neither reaches the result."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 5, generator=gen)
    input_ids = torch.randint(0, 5, (2, 6), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    expected, _ = _ce_reference(logits, input_ids, mask)
    input_ids[0, 4:] = -100
    logits[0, 4:, :] = float("-inf")
    logps, n = sequence_logps(logits, input_ids, mask)
    assert torch.isfinite(logps).all()
    torch.testing.assert_close(logps.double(), expected, rtol=1e-6, atol=1e-5)
    assert n.tolist() == [2, 5]


def test_bf16_logits_are_upcast():
    """bf16 logits give the fp32 computation on the same (bf16-rounded) values, exactly."""
    gen = torch.Generator().manual_seed(4)
    logits = (8 * torch.randn(3, 10, 1000, generator=gen)).bfloat16()
    input_ids = torch.randint(0, 1000, (3, 10), generator=gen)
    mask = torch.ones(3, 10, dtype=torch.bool)
    logps, _ = sequence_logps(logits, input_ids, mask)
    fp32, _ = sequence_logps(logits.float(), input_ids, mask)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, fp32, rtol=0, atol=0)
    # ...whereas log_softmax in bf16 itself lands measurably elsewhere.
    bf16 = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).sum((1, 2))
    assert (bf16.float() - fp32).abs().max() > 1e-2


def test_gradient_only_reaches_scored_positions():
    """d logps / d logits is zero at positions whose next token is not a completion token."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 6, 4, generator=gen, requires_grad=True)
    input_ids = torch.randint(0, 4, (1, 6), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])  # scores input_ids[2..4] -> logits[1..3]
    logps, _ = sequence_logps(logits, input_ids, mask)
    logps.sum().backward()
    touched = (logits.grad[0].abs().sum(-1) > 0).tolist()
    assert touched == [False, True, True, True, False, False]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        sequence_logps(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long),
                       torch.zeros(2, 4))
    with pytest.raises(ValueError):
        sequence_logps(torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long),
                       torch.zeros(2, 4))
