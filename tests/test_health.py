"""megakto.health: each detector on synthetic metric sequences, fired by the failure it names and
silent on a healthy run; the monitor's rate limit."""

import pytest

from megakto.health import HealthMonitor, HealthThresholds, check_eval, check_steps

T = HealthThresholds(window=10, warmup_steps=20, every_steps=30)


def healthy(n):
    """Learning as the demo does: chosen rewards up, rejected down, margin up, KL mild and noisy."""
    return [{"loss": 0.5 - 0.002 * i, "kl": 0.2 + 0.05 * (i % 3), "rewards/chosen": 0.01 * i,
             "rewards/rejected": -0.01 * i, "rewards/margins": 0.02 * i, "grad_norm": 0.3 + 0.01 * (i % 4)}
            for i in range(n)]


def symptoms(history, **kw):
    return [f.symptom for f in check_steps(history, T, step=len(history), **kw)]


def test_a_healthy_run_is_silent():
    for n in range(1, 60):
        assert symptoms(healthy(n)) == [], n


def test_both_rewards_falling():
    h = healthy(30)
    for i, m in enumerate(h[-10:]):  # the last 10 steps: both classes lose 0.1 per step
        m["rewards/chosen"], m["rewards/rejected"] = 0.0 - 0.1 * i, -0.2 - 0.1 * i
        m["rewards/margins"] = 0.2
    found = check_steps(h, T, step=30)
    assert [f.symptom for f in found] == ["rewards_falling"]
    assert found[0].message == (
        "rewards of desirable and undesirable completions both fell over the last 10 steps (0 -> -0.9 and -0.2 -> "
        "-1.1): the policy is lowering every completion (likelihood displacement); lower optim.lr, raise kto.beta, "
        "or add kto.sft_weight")
    # Only one class falling is what KTO is for.
    for m in h[-10:]:
        m["rewards/chosen"] = 0.5
    assert symptoms(h) == []


def test_kl_rising_steadily_but_not_noise_or_without_a_kl_term():
    h = healthy(30)
    for i, m in enumerate(h[-10:]):
        m["kl"] = 0.5 + 0.8 * i  # 0.5 -> 7.7
    assert symptoms(h) == ["kl_rising"]
    assert symptoms(h, kl_checks=False) == []  # apo_zero_unpaired, sft: the KL metric means nothing
    for i, m in enumerate(h[-10:]):
        m["kl"] = 3.0 if i % 2 else 0.2  # large but not a trend
    assert symptoms(h) == []


def test_margin_flat_only_after_the_warmup():
    h = healthy(30)
    for m in h[-10:]:
        m["rewards/margins"] = -0.01
    assert symptoms(h) == ["margin_flat"]
    assert check_steps(h[:15] + h[-10:], HealthThresholds(window=10, warmup_steps=100), step=25) == []


def test_saturated_sigmoids():
    h = healthy(30)
    for m in h[-10:]:
        m["grad_norm"], m["loss"] = 0.001, 0.5
    found = check_steps(h, T, step=30)
    assert [f.symptom for f in found] == ["saturated"]
    assert "the gradient norm fell to 0.001 (0.3% of its peak 0.33) while the loss stayed at 0.5000" in found[0].message
    h[-1]["loss"] = 0.3  # the loss still moves: small gradients, not saturation
    assert symptoms(h) == []


def test_kl_clamped_at_zero_for_the_whole_run():
    h = healthy(25)
    for m in h:
        m["kl"] = 0.0
    found = check_steps(h, T, step=25)
    assert [f.symptom for f in found] == ["kl_zero"]
    assert found[0].message.startswith("the KL estimate has been 0 (clamped) for all 25 steps")
    h[3]["kl"] = 0.01
    assert symptoms(h) == []
    assert symptoms(h[:10] + [dict(m, kl=0.0) for m in h[10:]]) == []  # was not zero the whole run
    # A run resumed at step 60 has seen 3 steps itself: too few to say "the whole run".
    assert [f.symptom for f in check_steps([{"kl": 0.0}] * 3, T, step=60)] == []


def test_single_class_micro_batches_and_gradient_spikes():
    found = check_steps(healthy(5), T, step=5, single_class_micro_batches=2)
    assert [f.symptom for f in found] == ["single_class"]
    assert found[0].message.startswith("2 micro-batch(es) of step 5 held rows of one class only")
    h = healthy(15)
    h[-1]["grad_norm"] = 20.0
    found = check_steps(h, T, step=15, grad_clip=1.0)
    assert [f.symptom for f in found] == ["grad_spike"]
    assert "(optim.grad_clip=1 bounds the update)" in found[0].message


def test_held_out_accuracy_at_chance_after_the_warmup():
    assert check_eval([(0, {"reward_accuracy": 0.5})], T) == []  # the reference itself
    assert check_eval([(10, {"reward_accuracy": 0.52})], T) == []  # still warming up
    found = check_eval([(0, {"reward_accuracy": 0.5}), (40, {"reward_accuracy": 0.52})], T)
    assert [f.symptom for f in found] == ["eval_chance"]
    assert found[0].message.startswith("held-out reward accuracy is 0.520 at step 40, chance level")
    assert check_eval([(40, {"reward_accuracy": 0.8})], T) == []


def test_nan_metrics_of_skipped_steps_are_ignored():
    h = healthy(30)
    h[-3] = {"loss": float("nan"), "kl": 0.2}
    assert symptoms(h) == []


def test_the_monitor_reports_each_symptom_once_per_every_steps():
    monitor = HealthMonitor(T, grad_clip=1.0)
    fired = []
    for step, m in enumerate(healthy(100), start=1):
        if step > 20:
            m = dict(m, **{"rewards/margins": -0.1})
        fired += [(step, line.split(":")[0]) for line in monitor.step(step, m)]
    # First at step 28: the window of steps 19-28 averages (0.34 + 0.36 - 8 x 0.1) / 10 < 0; then every 30 steps.
    assert [s for s, _ in fired] == [28, 58, 88]
    assert all(text.startswith("the reward margin averaged") for _, text in fired)


@pytest.mark.parametrize("field", ["window", "every_steps"])
def test_thresholds_come_from_the_config(field):
    from dataclasses import asdict

    from megakto.config import Config

    assert set(asdict(HealthThresholds())) == set(asdict(Config().health))
    assert getattr(HealthThresholds(**asdict(Config().health)), field) == getattr(HealthThresholds(), field)


def _collapsing():
    """40 steps with the KL clamped at 0 throughout, a gradient spike at step 13 (the run's peak, which
    the collapse is then measured against) and from step 26 a collapsed gradient and falling rewards."""
    history = healthy(40)
    for i, m in enumerate(history):
        m["kl"] = 0.0
        if i >= 25:
            m.update({"grad_norm": 1e-5, "loss": 0.5, "rewards/chosen": -0.5 * i, "rewards/rejected": -0.5 * i})
    history[12]["grad_norm"] = 30.0
    return history


def test_the_monitor_keeps_constant_memory_and_finds_what_the_whole_history_shows():
    """The monitor holds the last window of steps and a RunSummary, not the run: its findings at
    every step equal check_steps over the whole history (collapse, zero KL, a spike)."""
    t = HealthThresholds(window=10, warmup_steps=20, every_steps=1)
    history = _collapsing()
    history[5] = {"loss": float("nan"), "kl": 0.0}  # a skipped step
    monitor = HealthMonitor(t)
    for step, m in enumerate(history, start=1):
        got = monitor.step(step, m)
        want = [f.message for f in check_steps(history[:step], t, step=step)]
        assert got == want, step
    assert len(monitor.history) == 10 and len(monitor.summary.norms) == 11
    kinds = {f.symptom for step in range(1, 41) for f in check_steps(history[:step], t, step=step)}
    assert {"grad_spike", "saturated", "kl_zero", "rewards_falling"} <= kinds


def _routed(h, layer_loads):
    """``layer_loads``: one (min, max) per MoE layer, the same in every step of ``h``."""
    for m in h:
        for i, (low, high) in enumerate(layer_loads):
            m[f"router/layer{i}/load_min"], m[f"router/layer{i}/load_max"] = low, high
    return h


def test_router_collapse_after_a_window_of_one_expert_taking_nearly_every_token():
    """health.router_collapse (0.9): in every step of the window one expert of a MoE layer received
    at least 90% of the step's tokens while another received less. Layer 1 (97%) is named over
    layer 0 (92%); a layer whose experts all see every token (top-k = E: min = max = 1) is balanced,
    and one step below the threshold inside the window keeps it silent."""
    h = _routed(healthy(30), [(0.05, 0.92), (0.0, 0.97), (0.30, 0.70)])
    found = check_steps(h, T, step=30, router_aux_coef=0.001)
    assert [f.symptom for f in found] == ["router_collapse"]
    assert found[0].message == (
        "router collapse: in MoE layer 1 the busiest expert received 97% of the tokens (the idlest 0%) in each of "
        "the last 10 steps: the router sends nearly every token to the same experts; raise kto.router_aux_coef "
        "(now 0.001) or lower optim.lr")
    assert symptoms(_routed(healthy(30), [(0.3, 0.7), (1.0, 1.0)])) == []
    h = _routed(healthy(30), [(0.0, 0.97)])
    h[-4]["router/layer0/load_max"] = 0.85
    assert symptoms(h) == []
    assert symptoms(_routed(healthy(9), [(0.0, 0.97)])) == []  # less than a window


def test_the_monitor_names_the_runs_router_coefficient():
    monitor = HealthMonitor(T, router_aux_coef=0.02)
    lines = [monitor.step(i + 1, m) for i, m in enumerate(_routed(healthy(10), [(0.0, 1.0)]))]
    assert lines[:9] == [[]] * 9 and len(lines[9]) == 1 and "(now 0.02)" in lines[9][0]


def _resumed(monitor, t, tmp_path):
    """A new monitor continuing from ``monitor``'s state as a checkpoint stores it (torch.save, then
    a ``weights_only`` load)."""
    import torch

    torch.save(monitor.state_dict(), tmp_path / "health.pt")
    out = HealthMonitor(t)
    out.load_state_dict(torch.load(tmp_path / "health.pt", weights_only=True))
    return out


def test_a_resumed_monitor_reports_what_the_uninterrupted_one_does(tmp_path):
    """Interrupted after step 40 of the rate-limit run: the resumed monitor fires at 58 and 88 like
    the uninterrupted one (a fresh one would refill its window and fire at 49); interrupted after
    step 17 of the whole-history run: the same lines at every later step (kl_zero from step 20, which
    a fresh monitor would reach only 20 steps after the resume) and the same state at the end."""
    straight, first = HealthMonitor(T), HealthMonitor(T)
    margins = [dict(m, **{"rewards/margins": -0.1}) if step > 20 else m
               for step, m in enumerate(healthy(100), start=1)]
    fired = {}
    for step, m in enumerate(margins, start=1):
        assert straight.step(step, m) == (first if step <= 40 else fired["resumed"]).step(step, m), step
        if step == 40:
            fired["resumed"] = _resumed(first, T, tmp_path)
    assert fired["resumed"].state_dict() == straight.state_dict()

    t = HealthThresholds(window=10, warmup_steps=20, every_steps=1)
    history = _collapsing()
    straight, resumed = HealthMonitor(t), HealthMonitor(t)
    for step, m in enumerate(history[:17], start=1):
        straight.step(step, m), resumed.step(step, m)
    resumed = _resumed(resumed, t, tmp_path)
    assert resumed.summary.steps == 17 and resumed.summary.peak_grad_norm == 30.0
    lines = []
    for step, m in enumerate(history[17:], start=18):
        lines.append(resumed.step(step, m))
        assert lines[-1] == straight.step(step, m), step
    assert any(line.startswith("the KL estimate has been 0") for line in lines[2]) and lines[1] == []
    assert resumed.state_dict() == straight.state_dict()


def test_a_smaller_window_keeps_the_newest_steps(tmp_path):
    monitor = HealthMonitor(T)
    for step, m in enumerate(healthy(12), start=1):
        monitor.step(step, m)
    small = HealthMonitor(HealthThresholds(window=4))
    small.load_state_dict(monitor.state_dict())
    assert list(small.history) == healthy(12)[-4:]
    assert list(small.summary.norms) == [m["grad_norm"] for m in healthy(12)[-5:]]
    assert small.summary.steps == 12
