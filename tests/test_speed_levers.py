"""The speed levers of issue #15 keep results exact: rows dropped from generation give generate's
tokens, and the KL's running bound and the role-start bound prune a dominated trial before any
harmful batch is generated."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from test_metrics import EOS, batch, make_model, manual_greedy, tokenizer  # noqa: F401  (fixtures)
from test_pipeline import full_ablation, make_parts, params_at

import abliterate.metrics
import abliterate.scorers.base
from abliterate.callbacks import Pruning
from abliterate.data import shard_batches
from abliterate.decode import can_drop_rows
from abliterate.metrics import _greedy_generate, generate_responses, greedy_reply_tokens
from abliterate.options import DirectionOptions, EvalOptions
from abliterate.pipeline import Pipeline
from abliterate.plans import TrialPlan
from abliterate.scorers import KL, Degeneration, MarkerRefusals, Observations, ProbeRefusals
from abliterate.scorers.base import Decode


def hf_generate_only(monkeypatch) -> None:
    """The path before row dropping: HF generate decodes every row to the end of its batch."""
    monkeypatch.setattr(abliterate.metrics, "can_drop_rows", lambda model: False)


@pytest.mark.parametrize("seed", [0, 2])
def test_dropping_finished_rows_gives_generates_tokens(seed, tokenizer, batch, monkeypatch):  # noqa: F811
    input_ids, attention_mask = batch
    model = make_model(seed)
    assert can_drop_rows(model)
    plain = generate_responses(model, tokenizer, input_ids, attention_mask, max_new_tokens=8)
    # A marker that ends one row after its first word while the others go on: rows stop at mixed steps.
    marker = plain[0].split()[0]
    settings = {"eos": None, "marker": [marker]}
    dropped = {
        name: generate_responses(model, tokenizer, input_ids, attention_mask, max_new_tokens=8, markers=markers)
        for name, markers in settings.items()
    }
    assert dropped["eos"] == plain
    assert dropped["marker"][0].split() == [marker]
    assert len({len(text.split()) for text in dropped["marker"]}) > 1  # rows finished at different steps
    with monkeypatch.context() as patch:
        hf_generate_only(patch)
        for name, markers in settings.items():
            expected = generate_responses(
                model, tokenizer, input_ids, attention_mask, max_new_tokens=8, markers=markers
            )
            assert dropped[name] == expected, name


def observations(model, tok, input_ids, attention_mask, decode=Decode(), reference=None) -> Observations:
    module = SimpleNamespace(model=model, tokenizer=tok, eval_options=EvalOptions())
    rows = {"role": "eval_harmless", "index": torch.arange(len(input_ids))}
    return Observations(module, {**rows, "input_ids": input_ids, "attention_mask": attention_mask}, reference, decode)


def counting_prefills(model) -> list[int]:
    """Rows of each forward of `model` over more than one position (a decode's prefill) from here on."""
    calls = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[1] > 1:
            calls.append(ids.shape[0])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("path", ["drop rows", "generate"])
def test_one_decode_serves_the_kl_continuation_and_the_replies(path, tokenizer, batch, monkeypatch):  # noqa: F811
    input_ids, attention_mask = batch
    model = make_model(2)  # rows that emit eos within 7 tokens, and rows that do not
    through = manual_greedy(model, input_ids, attention_mask, steps=7)
    assert any(EOS in row[:6] for row in through.tolist()) and any(EOS not in row for row in through.tolist())
    # The continuation runs on past eos, as generate() without eos does; the replies stop at eos.
    assert torch.equal(_greedy_generate(model, input_ids, attention_mask, 7, 0, None), through)
    replies = greedy_reply_tokens(model, tokenizer, input_ids, attention_mask, 9)
    if path == "generate":  # a model whose cache rows cannot be dropped (remote code)
        hf_generate_only(monkeypatch)
    calls = counting_prefills(model)
    obs = observations(model, tokenizer, input_ids, attention_mask, KL(tokens=8).decodes(True) | Decode(steps=9))
    assert torch.equal(obs.continuation(8), through)
    assert obs.replies(9) == replies
    assert calls == [len(input_ids)]  # one decode for both
    assert greedy_reply_tokens(model, tokenizer, input_ids, attention_mask, 9) == replies


def test_degeneration_decodes_only_the_prompts_it_can_count(tokenizer, batch):  # noqa: F811
    input_ids, attention_mask = batch
    original, edited = make_model(4), make_model(9)
    scorer = Degeneration(max_new_tokens=12, ngram=1, repeats=3)
    kept = scorer.observe_original(observations(original, tokenizer, input_ids, attention_mask))["degenerate"]
    assert 0 < int(kept.sum()) < len(kept)  # some prompts the edited model cannot make worse
    replies = greedy_reply_tokens(edited, tokenizer, input_ids, attention_mask, 12)
    expected = [bool(scorer._flags([r])[0]) and not was for r, was in zip(replies, kept.tolist(), strict=True)]
    assert 0 < sum(expected) < len(expected) - int(kept.sum())  # a new degenerate reply, and an open row that is fine
    calls = counting_prefills(edited)
    scorer.reset()
    scorer.update(
        observations(edited, tokenizer, input_ids, attention_mask, reference={"degeneration.degenerate": kept})
    )
    assert scorer.compute() == sum(expected) / len(expected)
    assert calls == [len(kept) - int(kept.sum())]


@pytest.fixture(scope="module")
def organism_pipe(organism_dir, tmp_path_factory):
    module, data, trainer = make_parts(organism_dir)
    pipe = Pipeline(trainer, module, data, tmp_path_factory.mktemp("run"))
    pipe.residuals()
    return pipe, pipe.reference()


def test_dropping_finished_rows_keeps_trial_results_on_the_organism(organism_pipe, monkeypatch):
    pipe, reference = organism_pipe
    params = full_ablation(pipe.module.n_layers)
    plans = [TrialPlan(DirectionOptions(), params_at(params, i)) for i in (0, pipe.module.n_layers - 1)]
    dropped = [pipe.evaluate(plan, reference) for plan in plans]
    with monkeypatch.context() as patch:
        hf_generate_only(patch)
        generated = [pipe.evaluate(plan, reference) for plan in plans]
    for a, b in zip(dropped, generated, strict=True):
        assert a.responses == b.responses
        assert a.values == b.values
    # The organism refuses (marker stops) and the ablated one answers (eos stops): both kinds of stop ran.
    assert reference.values["refusals"] > 0.9 and min(r.values["refusals"] for r in dropped) < 0.5


class RecordingTrial:
    def __init__(self):
        self.user_attrs = {}

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value


def test_best_possible_refusal_rate():
    assert MarkerRefusals().best_possible() == 0.0
    assert MarkerRefusals(direction="maximize").best_possible() == 1.0
    assert KL().best_possible() is None
    assert ProbeRefusals().best_possible() == 0.0  # any refusal rate, not only the markers'


def test_dominated_trial_is_pruned_before_any_harmful_batch(organism_pipe, monkeypatch):
    pipe, reference = organism_pipe
    plan = TrialPlan(DirectionOptions(), params_at(full_ablation(pipe.module.n_layers), 1))
    kl = pipe.evaluate(plan, reference).values["kl"]
    assert kl > 0
    generated = []
    inner = abliterate.scorers.base.generate_responses
    monkeypatch.setattr(
        abliterate.scorers.base, "generate_responses", lambda *a, **k: generated.append(1) or inner(*a, **k)
    )
    totals = {role: len(pipe.datamodule.dataset(role)) for role in ("eval_harmful", "eval_harmless")}

    degeneration = next(s for s in pipe.scorers if not s.is_objective)  # reported, never optimised
    observed = []
    monkeypatch.setattr(degeneration, "update", lambda obs: observed.append(len(generated)))
    checks = []  # (role, bound, prompts seen) of every pruning check
    check = Pruning._prune_if_dominated

    def record(self, trainer, role, bound, seen):
        checks.append((role, list(bound), seen))
        return check(self, trainer, role, bound, seen)

    monkeypatch.setattr(Pruning, "_prune_if_dominated", record)

    def run(completed):
        for calls in (generated, observed, checks):
            calls.clear()
        trial = RecordingTrial()
        pruning = Pruning(trial, pipe.objectives, completed, totals)
        try:
            pipe.evaluate(plan, reference, [pruning])
        except optuna.TrialPruned:
            return True, trial, len(generated)
        return False, trial, len(generated)

    # Not dominated (an equal KL, or more): every batch runs, and the checks show the KL bound rising
    # batch by batch to the trial's KL, with 0 (the best possible) standing in for the refusals.
    n_batches = len(shard_batches(totals["eval_harmful"], pipe.datamodule.eval_batch_size, 0, 1))
    harmless_batches = shard_batches(totals["eval_harmless"], pipe.datamodule.eval_batch_size, 0, 1)
    harmless = len(harmless_batches)
    for completed in ([(0.0, kl)], [(0.0, 2 * kl)]):
        pruned, trial, batches = run(completed)
        assert not pruned and batches == n_batches == 4
        # Reported scorers run once per harmless batch, after every harmful batch was generated.
        assert observed == [n_batches] * harmless
    kl_bounds = [bound[1] for role, bound, _ in checks if role == "eval_harmless"]
    assert [bound[0] for role, bound, _ in checks if role == "eval_harmless"] == [0.0] * harmless
    assert len(kl_bounds) == harmless > 1 and kl_bounds == sorted(kl_bounds)
    assert 0 < kl_bounds[0] and kl_bounds[-1] == pytest.approx(kl, abs=1e-5) and kl_bounds[-2] < kl

    # A completed trial at 0 refusals with less KL than this trial's bound after its first harmless
    # batch: pruned there, part-way through the KL pass, before any reply is generated.
    pruned, trial, batches = run([(0.0, kl_bounds[0] / 2)])
    assert pruned and batches == 0 and observed == []  # a pruned trial never pays for reported scorers
    assert trial.user_attrs["pruned_in"] == "eval_harmless" and trial.user_attrs["bound"][0] == 0.0
    assert trial.user_attrs["prompts_seen"] == len(harmless_batches[0]) < totals["eval_harmless"]
    # Between the bound before the last harmless batch and the KL: pruned when the harmful role starts.
    pruned, trial, batches = run([(0.0, (kl_bounds[-2] + kl) / 2)])
    assert pruned and batches == 0 and observed == []
    assert trial.user_attrs["pruned_in"] == "eval_harmful" and trial.user_attrs["prompts_seen"] == 0
    assert trial.user_attrs["bound"] == [0.0, pytest.approx(kl)]


def test_kl_running_bound_never_exceeds_the_final_kl():
    torch.manual_seed(0)
    reference = torch.log_softmax(torch.randn(12, 4, 50), dim=-1)
    model = torch.log_softmax(reference + 0.3 * torch.randn(12, 4, 50), dim=-1)
    model[:3] = reference[:3]  # prompts the edit leaves alone: KL 0 up to rounding

    class OneProcess:
        def reduce(self, tensor, reduce_op):
            return tensor

    scorer, bounds = KL(), []
    for rows in torch.arange(12).split(5):
        scorer.kl.update(model[rows], reference[rows])
        bounds.append(scorer.bound(OneProcess(), total=12))
    final = scorer.compute()
    assert bounds == sorted(bounds) and all(b <= final for b in bounds)
    assert bounds[-1] == pytest.approx(final, rel=1e-6) and bounds[0] < final


@pytest.mark.slow
def test_gpu_bench_smoke_prints_every_figure():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(root / "scripts/bench_gpu.sh"), "--smoke"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["smoke"] and set(report["shapes"]) == {"llama_8b", "moe_qwen3"}
    for row in report["shapes"].values():
        assert row["residual_tokens_per_s"] > 0 and row["s_per_trial"] > 0 and row["trials"] == 1
        assert "peak_gpu_gb" in row
        modes = row["decode_modes"]
        assert set(modes) == {"eager", "sdpa", "static", "static_compiled", "drop_rows"}
        assert modes["static_compiled"] == {"skipped": "needs a GPU"}
        # fp32 on the CPU: every mode decodes eager's tokens.
        for mode in ("sdpa", "static", "drop_rows"):
            assert modes[mode]["rows_equal_to_eager"] == 1.0 and modes[mode]["s"] > 0
    assert report["contrastive_pca"]["s"] > 0 and report["peak_rss_gb"] > 0
