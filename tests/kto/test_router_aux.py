"""megakto.kto.router_aux: the router's balancing loss E · Σ_e f_e P_e on routings worked by hand,
its gradient, the token mask, the layers pooled as transformers pools them, and a packed layout
of rows counting exactly the tokens of the same rows padded."""

import math

import pytest
import torch

from megakto.kto import load_balancing_loss

L3 = math.log(3.0)
TO_0, TO_1 = [L3, 0.0], [0.0, L3]  # softmax (3/4, 1/4) and (1/4, 3/4)


def test_hand_worked_value_and_loads():
    """E = 2, top-1, one layer. Tokens 1-3 have logits (ln 3, 0): probabilities (3/4, 1/4), routed
    to expert 0; token 4 has (0, ln 3): (1/4, 3/4), routed to expert 1; a fifth, padding, token
    (0, ln 9) is masked out. f = (3/4, 1/4), P = ((3·3/4 + 1/4)/4, (3·1/4 + 3/4)/4) = (5/8, 3/8),
    aux = 2 (3/4 · 5/8 + 1/4 · 3/8) = 2 · 18/32 = 1.125. Unmasked the padding would count:
    f = (3/5, 2/5), P = ((9/4 + 1/4 + 0.1)/5, (3/4 + 3/4 + 0.9)/5) = (0.52, 0.48), aux = 1.008."""
    logits = torch.tensor([TO_0, TO_0, TO_0, TO_1, [0.0, math.log(9.0)]])
    out = load_balancing_loss([logits], torch.tensor([1, 1, 1, 1, 0]), top_k=1)
    assert float(out.loss) == pytest.approx(1.125, abs=1e-6)
    assert out.counts.tolist() == [[3.0, 1.0]] and float(out.tokens) == 4.0
    assert out.counts.dtype == out.tokens.dtype == torch.float64 and not out.counts.requires_grad
    assert float(load_balancing_loss([logits], torch.ones(5), top_k=1).loss) == pytest.approx(1.008, abs=1e-6)


def test_hand_worked_gradient_reaches_the_real_tokens_only():
    """d aux / d z_tj = (E / T) Σ_e f_e p_te (δ_ej − p_tj) (f_e counts a choice: no gradient).
    Token 1 (p = (3/4, 1/4)): (2/4)(3/4 · 3/4 · 1/4 − 1/4 · 1/4 · 3/4) = 0.5 · 0.09375 = 0.046875
    for z_0 and its negative for z_1 (a softmax's logits move against each other); token 4
    (p = (1/4, 3/4)): (2/4)(3/4 · 1/4 · 3/4 − 1/4 · 3/4 · 1/4) = 0.046875 too; padding: 0."""
    logits = torch.tensor([TO_0, TO_0, TO_0, TO_1, [0.0, math.log(9.0)]], requires_grad=True)
    load_balancing_loss([logits], torch.tensor([1, 1, 1, 1, 0]), top_k=1).loss.backward()
    want = torch.tensor([[0.046875, -0.046875]] * 4 + [[0.0, 0.0]])
    torch.testing.assert_close(logits.grad, want, rtol=0, atol=1e-7)


def test_layers_are_pooled_as_transformers_pools_them():
    """Layer A as above (4 tokens, 3 to expert 0); layer B sends all 4 tokens to expert 1 with
    (1/4, 3/4). Pooled over the 8 (layer, token) pairs: f = (3/8, 5/8), P = ((9/4 + 1/4 + 1)/8,
    (3/4 + 3/4 + 3)/8) = (0.4375, 0.5625), aux = 2 (3/8 · 0.4375 + 5/8 · 0.5625) = 1.03125, not
    the mean of the layers' own losses (1.125 and 2 · 0.75 = 1.5: 1.3125). Loads stay per layer."""
    a = torch.tensor([TO_0, TO_0, TO_0, TO_1])
    b = torch.tensor([TO_1] * 4)
    out = load_balancing_loss([a, b], torch.ones(4), top_k=1)
    assert float(out.loss) == pytest.approx(1.03125, abs=1e-6)
    assert out.counts.tolist() == [[3.0, 1.0], [0.0, 4.0]] and float(out.tokens) == 4.0


def test_perfect_balance_gives_top_k():
    """E = 3, top-2: three tokens each favouring a different pair with logits (1, 1, 0) rotated.
    Every expert is chosen by 2 of 3 tokens (f_e = 2/3) and P_e = 1/3 by symmetry, so
    aux = 3 · 3 · (2/3 · 1/3) = 2 = k."""
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    out = load_balancing_loss([logits], torch.ones(3), top_k=2)
    assert float(out.loss) == pytest.approx(2.0, abs=1e-6)
    assert out.counts.tolist() == [[2.0, 2.0, 2.0]]


def test_no_token_gives_zero():
    out = load_balancing_loss([torch.randn(3, 4, requires_grad=True)], torch.zeros(3), top_k=2)
    assert float(out.loss.detach()) == 0.0 and float(out.tokens) == 0.0 and out.counts.sum() == 0


def test_packed_layout_counts_the_same_tokens_as_the_rows_padded():
    """Rows of 3, 2 and 4 tokens with fixed per-token logits, laid out padded (3 rows of 4) and
    packed (rows [r0 r1] and [r2 pad]); the padding gets logits of its own. The masks select the
    same 9 tokens: the same counts exactly, the same loss to float rounding, and the same gradient
    on each token's logits."""
    torch.manual_seed(0)
    layers, experts = 2, 4
    rows = [torch.randn(layers, n, experts) for n in (3, 2, 4)]
    pad = torch.randn(layers, 1, experts) * 5

    def laid_out(order, width):
        logits = [[], []]
        mask = []
        for members in order:
            used = sum(rows[i].shape[1] for i in members)
            for layer in range(layers):
                logits[layer] += [rows[i][layer] for i in members] + [pad[layer].expand(width - used, -1)]
            mask += [1] * used + [0] * (width - used)
        return [torch.cat(lg).requires_grad_() for lg in logits], torch.tensor(mask)

    padded_logits, padded_mask = laid_out([[0], [1], [2]], 4)
    packed_logits, packed_mask = laid_out([[0, 1], [2]], 5)
    padded = load_balancing_loss(padded_logits, padded_mask, top_k=2)
    packed = load_balancing_loss(packed_logits, packed_mask, top_k=2)
    assert torch.equal(padded.counts, packed.counts) and float(padded.tokens) == float(packed.tokens) == 9.0
    torch.testing.assert_close(packed.loss, padded.loss, rtol=0, atol=1e-7)
    padded.loss.backward()
    packed.loss.backward()
    real = padded_mask.bool()
    for a, b in zip(padded_logits, packed_logits):
        torch.testing.assert_close(b.grad[packed_mask.bool()], a.grad[real], rtol=0, atol=1e-7)
        assert a.grad[~real].abs().sum() == 0 and b.grad[~packed_mask.bool()].abs().sum() == 0
