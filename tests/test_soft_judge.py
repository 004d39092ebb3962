"""ProbeRefusals: a refusal judge fit on the model's own behaviour (no markers), and its maths."""

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from helpers import organism_pipeline

from abliterate.ablation import AblationParams, ComponentKernel, WeightEditor
from abliterate.cli import main
from abliterate.decode import eos_token_ids
from abliterate.errors import AbliterateError
from abliterate.hooks import HookEditor
from abliterate.models import residual_writers
from abliterate.options import DirectionOptions
from abliterate.plans import TrialPlan
from abliterate.scorers import KL, MarkerRefusals, ProbeRefusals
from abliterate.scorers.original import original_weights, sampled_replies
from abliterate.scorers.reply_probe import choose_probe, fit_probe, held_out_accuracy, probe_scores, reply_states

# ---- maths on plain tensors -----------------------------------------------------------------


def two_classes(n: int = 40, d: int = 6, shift: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)
    positive = torch.randn(n, d, generator=g) @ mix
    negative = torch.randn(n, d, generator=g) @ mix
    positive[:, 0] += shift
    return positive, negative


def test_probe_is_the_shrunk_linear_discriminant_with_a_midpoint_threshold():
    positive, negative = two_classes()
    weight, bias = fit_probe(positive, negative, shrinkage=0.1)
    # Reference: the textbook formula, written out separately in float64.
    p, n = positive.double(), negative.double()
    scatter = ((p - p.mean(0)).T @ (p - p.mean(0)) + (n - n.mean(0)).T @ (n - n.mean(0))) / (len(p) + len(n) - 2)
    shrunk = 0.9 * scatter + 0.1 * scatter.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    expected = torch.linalg.inv(shrunk) @ (p.mean(0) - n.mean(0))
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-6)
    midpoint = (p.mean(0) + n.mean(0)) / 2
    assert probe_scores(midpoint[None].float(), weight, bias).abs().item() < 1e-3
    assert (
        probe_scores(p.mean(0)[None].float(), weight, bias).item()
        > 0
        > probe_scores(n.mean(0)[None].float(), weight, bias).item()
    )


def test_held_out_accuracy_tells_signal_from_noise():
    positive, negative = two_classes(shift=8.0)
    assert held_out_accuracy(positive, negative) >= 0.95
    same, other = two_classes(shift=0.0)
    assert held_out_accuracy(same, other) <= 0.75


def test_the_layer_that_separates_the_replies_is_chosen():
    noise_p, noise_n = two_classes(shift=0.0, seed=1)
    signal_p, signal_n = two_classes(shift=8.0, seed=2)
    positive = torch.stack([noise_p, signal_p, noise_p], dim=1)
    negative = torch.stack([noise_n, signal_n, noise_n], dim=1)
    probe = choose_probe(positive, negative, layers=[3, 7, 9])
    assert probe.layer == 7
    weight, bias = fit_probe(signal_p, signal_n)
    torch.testing.assert_close(probe.weight, weight)


def test_probe_options_out_of_range_name_the_fix():
    with pytest.raises(AbliterateError, match="samples=-1: use 0"):
        ProbeRefusals(samples=-1)
    with pytest.raises(AbliterateError, match="fit_prompts=2: use at least 4"):
        ProbeRefusals(fit_prompts=2)


def test_loops_refuse_counts_a_looping_reply_the_probe_calls_an_answer():
    class AnswersOnly(ProbeRefusals):
        def verdicts(self, module, replies):
            return [False, True, False]

    class Obs:
        module = SimpleNamespace(eval_options=SimpleNamespace(max_new_tokens=24))

        def replies(self, n):
            return [[5, 6, 7, 8] * 3, [1, 2, 3], [1, 2, 3, 4, 1, 2, 3, 4, 9]]  # loops, refusal, answer

    for loops_refuse, expected in [(False, 1 / 3), (True, 2 / 3)]:
        judge = AnswersOnly(loops_refuse=loops_refuse)
        judge.update(Obs())
        assert judge.compute() == pytest.approx(expected)


def test_fit_probe_refuses_too_few_replies():
    with pytest.raises(ValueError, match="at least 2"):
        fit_probe(torch.zeros(1, 3), torch.zeros(5, 3))


# ---- on the tiny organism ------------------------------------------------------------------


@pytest.fixture(scope="module")
def organism(organism_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(organism_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(organism_dir)


def test_reply_states_average_the_reply_positions_whatever_the_padding(organism):
    model, tokenizer = organism
    prefix = tokenizer("<user> how do i bake bread ? <end> <assistant>", add_special_tokens=False)["input_ids"]
    short = tokenizer("bread is baked .", add_special_tokens=False)["input_ids"]
    long = tokenizer("bread is baked in an oven for an hour .", add_special_tokens=False)["input_ids"]
    states = reply_states(model, [short, long], [0, 1], tokenizer.pad_token_id, prefixes=[prefix, []])
    with torch.no_grad():
        hidden = model(torch.tensor([prefix + short]), output_hidden_states=True).hidden_states
    # hidden_states[1] is decoder layer 0's output; the last entry is after the final norm, so layer 1 is
    # compared through a hook-free second call below.
    torch.testing.assert_close(states[0, 0], hidden[1][0, len(prefix) :].mean(0), rtol=1e-5, atol=1e-5)
    alone = reply_states(model, [long], [0, 1], tokenizer.pad_token_id)
    torch.testing.assert_close(states[1], alone[0], rtol=1e-5, atol=1e-5)


def test_sampled_replies_are_seeded_varied_cut_at_eos_and_leave_the_callers_random_state(organism):
    model, tokenizer = organism
    prompts = [
        tokenizer(f"<user> how do i {task} ? <end> <assistant>", add_special_tokens=False)["input_ids"]
        for task in ("bake bread", "fix a bike")
    ]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = sampled_replies(model, tokenizer, prompts, max_new_tokens=8, samples=6, batch_size=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sampled_replies(model, tokenizer, prompts, max_new_tokens=8, samples=6, batch_size=1) == first
    assert sampled_replies(model, tokenizer, prompts, max_new_tokens=8, samples=6, seed=1, batch_size=1) != first
    assert len(first) == 12 and all(len(reply) <= 8 for reply in first)
    assert len({tuple(reply) for reply in first}) > 2  # temperature 1 on a tiny random model: replies differ
    eos = set(eos_token_ids(model, tokenizer))
    assert not any(token in eos for reply in first for token in reply)


@pytest.mark.parametrize("editor_kind", ["weights", "hooks"])
def test_original_weights_lifts_the_edit_only_inside_the_block(organism, editor_kind):
    model, tokenizer = organism
    writers = residual_writers(model)
    editor = WeightEditor(writers) if editor_kind == "weights" else HookEditor(writers)
    ids = tokenizer("<user> how do i bake bread ? <end> <assistant>", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        before = model(**ids).logits
        d = model.config.hidden_size
        directions = torch.nn.functional.normalize(
            torch.randn(len(writers), 1, d, generator=torch.Generator().manual_seed(0)), dim=-1
        )
        kernel = ComponentKernel(1.0, 0.0, 1.0, 10.0)
        with editor.applied(AblationParams({"attn": kernel, "mlp": kernel}), directions):
            edited = model(**ids).logits
            with original_weights(editor):
                lifted = model(**ids).logits
            again = model(**ids).logits
    assert not torch.allclose(edited, before)
    assert torch.equal(lifted, before)
    assert torch.equal(again, edited)


@pytest.mark.parametrize("samples", [0, 4])
def test_the_probe_sees_the_organism_refusals_and_their_drop_after_ablation(organism_dir, tmp_path, samples):
    """Fit on the organism's own replies (no markers), it agrees with the markers before and after the edit,
    also when sampled replies (mostly answers on this organism) blur its fitting refusals."""
    judge = ProbeRefusals(fit_prompts=32, samples=samples, max_new_tokens=12)
    pipe = organism_pipeline(
        organism_dir, tmp_path, [judge, KL(4), MarkerRefusals(direction="report")], eval_harmful=32, eval_batch_size=16
    )
    reference = pipe.reference()
    assert reference.values[judge.name] >= 0.9
    assert abs(reference.values[judge.name] - reference.values["refusals"]) <= 1 / 16
    last = pipe.module.n_layers - 1
    everywhere = ComponentKernel(1.0, float(last), 1.0, 10.0)
    plan = TrialPlan(
        DirectionOptions(projected=False), AblationParams({"attn": everywhere, "mlp": everywhere}, float(last))
    )
    after = pipe.evaluate(plan, reference).values
    assert after[judge.name] <= 0.1
    assert abs(after[judge.name] - after["refusals"]) <= 1 / 16


def judge_config(organism_config, tmp_path, eval_harmful=None):
    """The organism config with the shipped soft-refusal scorers (configs/examples/soft_refusals.yaml)."""
    example = (Path(__file__).resolve().parents[1] / "configs/examples/soft_refusals.yaml").read_text()
    scorers = example[example.index("  scorers:") :].replace("fit_prompts: 64", "fit_prompts: 32")
    text = organism_config.read_text().replace("module:\n", "module:\n" + scorers, 1)
    if eval_harmful is not None:
        text = text.replace(
            text.split("eval_harmful: ")[1].split("\n")[0], f"{{dataset: {eval_harmful}, split: train}}"
        )
    path = tmp_path / "judge.yaml"
    path.write_text(text)
    return path


def test_a_baseline_the_judge_sees_no_refusals_in_stops_with_one_line(organism_config, organism_dir, tmp_path, capsys):
    """Harmless prompts as the harmful eval set: the configured judge (not the markers) counts 0 refusals."""
    config = judge_config(organism_config, tmp_path, eval_harmful=organism_dir / "harmless_test.txt")
    args = ["run", "--config", str(config), "--model", str(organism_dir), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--data.eval_harmful.limit", "16", "--data.eval_harmless.limit", "16"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "probe_refusals on the harmful eval prompts is 0, at or under" in err and "nothing to remove" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_run_searched_by_the_probe_judge_end_to_end(organism_config, organism_dir, tmp_path, capsys):
    config = judge_config(organism_config, tmp_path)
    out = tmp_path / "run"
    args = ["run", "--config", str(config), "--model", str(organism_dir), "--output_dir", str(out)]
    # report_scorers completed: the markers (reported) are stored on every trial, to compare with the judge
    main([*args, "--study.n_trials", "6", "--study.n_startup_trials", "4", "--study.report_scorers", "completed"])
    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{out / 'study.db'}")
    assert study.metric_names == ["probe_refusals", "kl"]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(0.0 <= t.values[0] <= 1.0 and "refusals" in t.user_attrs for t in complete)
    # The judge and the markers it replaces agree on this organism, trial by trial.
    assert all(abs(t.values[0] - t.user_attrs["refusals"]) <= 0.05 for t in complete)
    assert min(t.values[0] for t in complete) <= 0.1
    assert (out / "model" / "config.json").is_file()
    text = capsys.readouterr().out
    harmful = len(organism_dir.joinpath("harmful_test.txt").read_text().splitlines())
    assert f"refusals on {harmful} harmful prompts" in text  # the reported markers read the harmful replies
