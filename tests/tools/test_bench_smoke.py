"""The benchmark harness's own parts: the workload's exact token counts, the memory probe, the
derived figures and the report. No training runs here (tools/bench.py itself takes minutes)."""

import os
import re

import pytest

from tests.launcher import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


workload = load_script("tools/_bench_workload.py", "_bench_workload")  # the name bench.py imports it by
bench = load_script("tools/bench.py", "megakto_tools_bench")  # puts tools/ on sys.path, imports its parts
import _bench_measure as measure  # noqa: E402
import _bench_report as report  # noqa: E402
import _bench_systems as systems  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return workload.build_tokenizer(100)


def test_rows_lengths_labels_and_seed():
    rows = workload.make_rows(41, 100, seed=3, prompt_words=(2, 9), completion_words=(4, 6))
    assert len(rows) == 41
    assert sum(r["label"] for r in rows) == 20  # 41 // 2 desirable
    assert len({r["prompt"] for r in rows}) == 41
    assert all(2 <= len(r["prompt"].split()) <= 9 for r in rows)
    assert all(4 <= len(r["completion"].split()) <= 6 and r["completion"].startswith(" ") for r in rows)
    assert rows == workload.make_rows(41, 100, seed=3, prompt_words=(2, 9), completion_words=(4, 6))
    assert rows != workload.make_rows(41, 100, seed=4, prompt_words=(2, 9), completion_words=(4, 6))
    words = {w for r in rows for w in (r["prompt"] + r["completion"]).split()}
    assert all(4 <= int(w[1:]) <= 99 for w in words)  # ids 0-3 are the specials


def test_one_token_per_word_in_both_trainers_tokenizations(tokenizer):
    """Prompt 'w5 w99 w7' -> [BOS, 5, 99, 7]; completion ' w4 w8' -> [4, 8]; TRL tokenizes
    prompt + completion + '</s>' in one go and must get prompt ids + completion ids + [EOS], so
    both trainers score 2 + 1 = 3 target tokens."""
    row = {"prompt": "w5 w99 w7", "completion": " w4 w8", "label": True}
    assert len(tokenizer) == 100
    assert tokenizer(row["prompt"])["input_ids"] == [2, 5, 99, 7]
    assert tokenizer(row["completion"], add_special_tokens=False)["input_ids"] == [4, 8]
    joined = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
    assert joined == [2, 5, 99, 7, 4, 8, 3]
    assert workload.target_tokens(row) == 3
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3)


def test_peak_rss_sees_a_touched_allocation():
    rss = measure.PeakRss(interval=0.005)
    base = rss.mark()
    block = bytearray(96 << 20)  # zero-filled by the allocator: resident
    block[:: 4096] = b"\x01" * len(block[:: 4096])
    import time
    time.sleep(0.05)
    del block
    peaks = rss.peak()
    assert peaks, "no peak method available"
    for value in peaks.values():
        assert value - base >= 90 << 20


def _result(name, tokens, timed_s, rows, setup_s, peak, setup_rss, precompute=None):
    return {"system": name, "ok": True, "target_tokens": tokens, "timed_s": timed_s, "rows": rows,
            "tokens_per_s": tokens / timed_s, "samples_per_s": rows / timed_s, "seconds_per_step": timed_s / 2,
            "timed_steps": 2, "cpu_s_per_step": timed_s,  # 2 threads busy all the time
            "setup_s": setup_s, "precompute_s": precompute, "peak_rss_mib": peak,
            "peak_beyond_setup_mib": peak - setup_rss}


def test_derived_figures_ratios_and_table():
    """megakto-kto: 1000 tokens in 10 s = 100/s; cached: 1000 tokens in 5 s = 200/s, precompute
    not exposed so it is setup 9 s - online setup 3 s = 6 s, charged 16 of 32 rows' share = 3 s,
    giving 1000 / (5 + 3) = 125/s; sft 1000 in 4 s = 250/s. TRL online 500 in 10 s = 50/s."""
    results = {
        "megakto-kto": _result("megakto-kto", 1000, 10.0, 16, 3.0, 900, 600),
        "megakto-kto-cached": _result("megakto-kto-cached", 1000, 5.0, 16, 9.0, 800, 600),
        "megakto-sft": _result("megakto-sft", 1000, 4.0, 16, 3.0, 700, 600),
        "trl-kto": _result("trl-kto", 500, 10.0, 16, 1.0, 1600, 400),
        "trl-kto-precomputed": {"system": "trl-kto-precomputed", "ok": False, "error": "exit 1: boom"},
    }
    report.add_derived(results, n_rows=32)
    assert results["megakto-kto-cached"]["precompute_s"] == pytest.approx(6.0)
    assert results["megakto-kto-cached"]["tokens_per_s_incl_precompute"] == pytest.approx(125.0)
    assert results["megakto-kto"]["tokens_per_s_incl_precompute"] == pytest.approx(100.0)
    got = dict(report.ratios(results))
    assert got["megakto KTO / megakto SFT, tokens/s"] == pytest.approx(0.4)
    assert got["megakto KTO cached / megakto SFT, tokens/s"] == pytest.approx(0.8)
    assert got["megakto KTO cached / megakto SFT, tokens/s incl. precompute"] == pytest.approx(0.5)
    assert got["megakto KTO / TRL KTO (online), tokens/s"] == pytest.approx(2.0)
    assert results["megakto-kto"]["tokens_per_cpu_s"] == pytest.approx(1000 / 20)
    assert got["megakto KTO / TRL KTO (online), tokens per CPU second"] == pytest.approx(2.0)
    assert got["megakto KTO / TRL KTO (online), peak beyond setup"] == pytest.approx(300 / 1200)
    assert got["megakto KTO cached / TRL KTO precomputed, tokens/s"] is None  # TRL run failed

    table = report.markdown(results, report.ratios(results)).splitlines()
    assert table[0].startswith("| system | target tokens/s |")
    widths = {line.count("|") for line in table[:7]}
    assert widths == {len(report.COLUMNS) + 1}  # every row, the failed one too, has every column
    assert table[2].split(" | ")[:3] == ["| megakto-kto", "100", "1.60"]
    assert "failed: exit 1: boom" in table[6]
    assert "| megakto KTO / TRL KTO (online), tokens/s | 2.00 |" in table


def test_median_run_picks_the_middle_throughput_and_keeps_every_figure():
    runs = [{"ok": True, "tokens_per_s": t, "peak_beyond_warm_mib": m} for t, m in ((300, 1), (100, 2), (200, 3))]
    chosen = report.median_run(runs)
    assert chosen["tokens_per_s"] == 200 and chosen["peak_beyond_warm_mib"] == 3
    assert chosen["runs_tokens_per_s"] == [300, 100, 200] and chosen["runs_peak_beyond_warm_mib"] == [1, 2, 3]
    assert report.median_run(runs[:2])["tokens_per_s"] == 100  # even count: the lower middle
    failed = {"ok": False, "error": "exit 1"}
    assert report.median_run(runs + [failed]) is failed


def test_parallel_variants_of_megakto_kto():
    assert systems.parallel_variant("megakto-kto-tp2") == ("tp", 2)
    assert systems.parallel_variant("megakto-kto-pp4") == ("pp", 4)
    assert systems.parallel_variant("megakto-kto") is None and systems.parallel_variant("megakto-kto-ppx") is None
    pp = systems.system_spec("megakto-kto-pp2")
    assert (pp["pp"], pp["ranks"], pp.get("tp", 1)) == (2, 2, 1)
    assert {k: v for k, v in pp.items() if k not in ("pp", "ranks")} == systems.SYSTEMS["megakto-kto"]
    assert systems.system_spec("megakto-kto")["ranks"] == 1


def test_expert_parallel_variant_and_its_zero3_baseline(tmp_path):
    """``--ep 2``: megakto-kto-ep2 (parallel.ep_size=2) and megakto-kto-dp2 (plain ZeRO-3) on 2 ranks
    each, compared with each other; it refuses a dense workload; the workload's qwen3_moe is the
    demo's family (top-2, every layer MoE, experts half as wide) with ``--experts`` experts."""
    assert systems.parallel_variant("megakto-kto-ep2") == ("ep", 2)
    assert systems.parallel_variant("megakto-kto-dp4") == ("dp", 4)
    for name, kind in (("megakto-kto-ep2", "ep"), ("megakto-kto-dp2", "dp")):
        spec = systems.system_spec(name)
        assert (spec[kind], spec["ranks"]) == (2, 2)
        assert {k: v for k, v in spec.items() if k not in (kind, "ranks")} == systems.SYSTEMS["megakto-kto"]
    with pytest.raises(SystemExit):
        bench.main(["--ep", "2", "--systems", ""])  # a Llama has no experts
    args = bench.argparse.Namespace(family="qwen3_moe", hidden=32, layers=2, heads=4, kv_heads=None, head_dim=None,
                                    intermediate=96, experts=6)
    _, shape = workload.write_model(tmp_path, vocab_size=100, seed=0, longest=64, **workload.model_shape(args))
    assert {k: shape[k] for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                                  "head_dim")} == {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                                   "decoder_sparse_step": 1, "head_dim": 8}
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path).num_experts == 6


def test_lora_variant_of_megakto_kto():
    lora = systems.system_spec("megakto-kto-lora16")
    assert (lora["lora"], lora["ranks"]) == (16, 1)
    assert {k: v for k, v in lora.items() if k not in ("lora", "ranks")} == systems.SYSTEMS["megakto-kto"]


def test_gpu_memory_columns_only_when_a_system_ran_on_a_gpu():
    cpu = {"megakto-kto": _result("megakto-kto", 1000, 10.0, 16, 3.0, 900, 600)}
    assert "peak GPU" not in report.markdown(cpu, [])
    gpu = {"megakto-kto": {**cpu["megakto-kto"], "peak_gpu_mib": 5000.0, "peak_gpu_reserved_mib": 5500.0},
           "megakto-sft": {**cpu["megakto-kto"], "peak_gpu_mib": 4000.0, "peak_gpu_reserved_mib": 4500.0}}
    table = report.markdown(gpu, []).splitlines()
    assert table[0].endswith("| peak GPU MiB | peak GPU reserved MiB |")
    assert table[2].endswith("| 5000 | 5500 |")
    assert dict(report.ratios(gpu))["megakto KTO / megakto SFT, peak GPU memory"] == pytest.approx(1.25)


def test_the_bench_parts_stay_small_and_no_tool_imports_bench_itself():
    """tools/bench.py is the CLI over _bench_measure, _bench_systems and _bench_report; the other
    tools import those parts' public names, never bench.py (whose names are its CLI's)."""
    tools = os.path.join(REPO, "tools")
    for name in ("bench.py", "_bench_measure.py", "_bench_systems.py", "_bench_report.py"):
        with open(os.path.join(tools, name), encoding="utf-8") as f:
            assert sum(1 for _ in f) <= 300, name
    assert bench.SYSTEMS is systems.SYSTEMS and bench.measure is systems.measure
    for name in sorted(os.listdir(tools)):
        if name.endswith(".py"):
            with open(os.path.join(tools, name), encoding="utf-8") as f:
                source = f.read()
            assert not re.search(r"^\s*(from bench import|import bench\b)", source, re.M), name
            for module in ("_bench_measure", "_bench_systems", "_bench_report"):
                for imported in re.findall(rf"^from {module} import (.+)$", source, re.M):
                    names = [n.strip().split(" as ")[0] for n in imported.split("#")[0].split(",")]
                    assert not any(n.startswith("_") for n in names), f"{name}: {imported}"
