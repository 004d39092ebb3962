"""The Lightning pipeline on the tiny organism: residuals, ablation, export, and refusals dropping."""

import json

import torch
from transformers import AutoModelForCausalLM

from abliterate.ablation import AblationParams, ComponentKernel
from abliterate.data import PromptDataModule
from abliterate.directions import winsorize
from abliterate.models import residual_writers
from abliterate.module import AbliterationModule
from abliterate.options import DirectionOptions, EvalOptions, LoadOptions
from abliterate.pipeline import Pipeline
from abliterate.plans import TrialPlan
from abliterate.prompts import PromptSource, format_chat
from abliterate.trainer import AbliterationTrainer


def make_parts(organism_dir, residual_positions: int = 1):
    module = AbliterationModule(
        model_id=str(organism_dir),
        load=LoadOptions(dtypes=["float32"]),
        evaluation=EvalOptions(max_new_tokens=12),
        residual_positions=residual_positions,
    )
    data = PromptDataModule(
        harmful=PromptSource(f"{organism_dir}/harmful_train.txt"),
        harmless=PromptSource(f"{organism_dir}/harmless_train.txt"),
        eval_harmful=PromptSource(f"{organism_dir}/harmful_test.txt"),
        eval_harmless=PromptSource(f"{organism_dir}/harmless_test.txt"),
        batch_size=32,
        eval_batch_size=16,
    )
    trainer = AbliterationTrainer(accelerator="cpu", devices=1, enable_progress_bar=False)
    return module, data, trainer


def full_ablation(n_layers: int) -> AblationParams:
    kernel = ComponentKernel(max_weight=1.0, max_weight_position=0.0, min_weight=1.0, min_weight_distance=n_layers)
    return AblationParams(components={"attn": kernel, "mlp": kernel}, direction_index=None)


def test_predict_collects_exact_last_token_residuals(organism_dir):
    module, data, trainer = make_parts(organism_dir)
    trainer.predict(module, datamodule=data, return_predictions=False)  # the README example

    harmful = module.residuals["harmful"]
    prompts = data.prompts("harmful")
    n_layers = module.n_layers
    assert harmful.shape == (len(prompts), n_layers, module.model.config.hidden_size)
    assert module.directions.shape == (n_layers, 1, module.model.config.hidden_size)

    # Reference: each prompt alone, unpadded; hidden_states[i + 1] is layer i's output (the last is post-norm).
    texts = format_chat(module.tokenizer, prompts[:5])
    for row, text in enumerate(texts):
        ids = module.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = module.model(**ids, output_hidden_states=True)
        for layer in range(n_layers - 1):
            torch.testing.assert_close(harmful[row, layer], out.hidden_states[layer + 1][0, -1], atol=1e-4, rtol=1e-4)

    # The direction (default: projected, winsorised) is the unit mean difference of the clamped residuals with
    # its component along the unit harmless mean removed, renormalised.
    bad, good = winsorize(DirectionOptions.winsorize, module.residuals["harmful"], module.residuals["harmless"])
    mu_g = good.mean(0)
    diff = bad.mean(0) - mu_g
    diff = diff / diff.norm(dim=-1, keepdim=True)
    g = mu_g / mu_g.norm(dim=-1, keepdim=True)
    diff = diff - (diff * g).sum(-1, keepdim=True) * g
    torch.testing.assert_close(module.directions[:, 0], diff / diff.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_residual_positions_average_the_prompts_last_tokens_and_key_the_cache(organism_dir, tmp_path):
    module, data, trainer = make_parts(organism_dir)
    last = Pipeline(trainer, module, data, tmp_path).residuals().tensors["harmful"]
    module3, data3, trainer3 = make_parts(organism_dir, residual_positions=3)
    tail = Pipeline(trainer3, module3, data3, tmp_path).residuals().tensors["harmful"]
    assert len(list((tmp_path / "cache").glob("residuals-*"))) == 2  # its own cache entry, not the 1-token one
    texts = format_chat(module3.tokenizer, data3.prompts("harmful")[:5])
    for row, text in enumerate(texts):
        ids = module3.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = module3.model(**ids, output_hidden_states=True)
        for layer in range(module3.n_layers - 1):  # the last hidden state is post-norm
            expected = out.hidden_states[layer + 1][0, -3:].mean(0)
            torch.testing.assert_close(tail[row, layer], expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(last[row, layer], out.hidden_states[layer + 1][0, -1], atol=1e-4, rtol=1e-4)
    assert torch.equal(Pipeline(trainer, module, data, tmp_path).residuals().tensors["harmful"], last)  # a hit


def test_residual_positions_leave_out_the_pads_of_short_prompts():
    from abliterate.module import capture_prompt_end

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # left-padded: row 0 has two tokens
    layer = torch.nn.Identity()
    with capture_prompt_end([layer], positions=3, attention_mask=mask) as captured:
        layer(hidden)
    torch.testing.assert_close(captured[0][0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(captured[0][1], hidden[1, 1:].mean(0))
    with capture_prompt_end([layer]) as captured:
        layer(hidden)
    assert torch.equal(captured[0], hidden[:, -1])


def writer_projections(model, directions):
    """Max relative |r . y| over every residual writer's output y, for random inputs."""
    worst = 0.0
    for layer, writers in enumerate(residual_writers(model)):
        r = directions[layer, 0]
        for refs in writers.values():
            for ref in refs:
                x = torch.randn(7, ref.weight.shape[-1])
                y = torch.nn.functional.linear(x, ref.weight)
                worst = max(worst, float((y @ r).abs().max() / y.norm(dim=-1).max()))
    return worst


def test_ablation_zeroes_projection_and_export_matches(organism_dir, tmp_path):
    module, data, trainer = make_parts(organism_dir)
    Pipeline(trainer, module, data, tmp_path / "run").residuals()
    params = full_ablation(module.n_layers)
    directions = module.directions
    assert writer_projections(module.model, directions) > 1e-2  # before: clearly non-zero

    target = tmp_path / "export"
    ids = module.tokenizer(
        format_chat(module.tokenizer, data.prompts("harmful")[:4]), return_tensors="pt", padding=True
    )
    with module.weight_editor().applied(params, directions):
        assert writer_projections(module.model, directions) < 1e-5
        with torch.no_grad():
            ablated_logits = module.model(**ids).logits
        from abliterate.export import save_checkpoint

        save_checkpoint(module.model, module.tokenizer, target, overwrite=False, card={"base_model": "organism"})

    exported = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        exported_logits = exported(**ids).logits
    assert (exported_logits - ablated_logits).abs().max() <= 1e-4
    assert writer_projections(exported, directions) < 1e-5
    # the in-memory model was restored exactly
    original = AutoModelForCausalLM.from_pretrained(organism_dir, dtype=torch.float32)
    for (name, p), q in zip(module.model.named_parameters(), original.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_trial_evaluation_drops_refusals_and_restores_weights(organism_dir, tmp_path):
    module, data, trainer = make_parts(organism_dir)
    pipe = Pipeline(trainer, module, data, tmp_path / "run")
    pipe.residuals()
    reference = pipe.reference()
    assert reference.values["refusals"] >= 0.9 and reference.values["kl"] == 0.0
    before = {n: p.clone() for n, p in module.model.named_parameters()}

    params = full_ablation(module.n_layers)
    best = min(
        (
            pipe.evaluate(TrialPlan(DirectionOptions(), params_at(params, index)), reference).values
            for index in range(module.n_layers)
        ),
        key=lambda r: r["refusals"],
    )
    assert best["refusals"] <= 0.1
    assert 0.0 <= best["kl"] <= 0.2
    for name, p in module.model.named_parameters():
        assert torch.equal(p, before[name]), name


def params_at(params: AblationParams, index: float) -> AblationParams:
    return AblationParams(components=params.components, direction_index=float(index))


def test_run_abliterates_the_organism(organism_dir, organism_config, tmp_path, capsys):
    """E2E (issue 5): refusals drop, harmless prompts stay answered, KL small, replies keep their topic."""
    from organism_helpers import generate_replies, measure_refusals, topic_rate

    from abliterate.cli import main
    from abliterate.organism_data import organism_prompts

    out = tmp_path / "run"
    main(
        [
            "run",
            "--config",
            str(organism_config),
            "--model",
            str(organism_dir),
            "--output_dir",
            str(out),
            "--study.n_trials",
            "24",
            "--study.n_startup_trials",
            "8",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["refusal_before"] >= 0.9
    assert summary["refusal_after"] <= 0.05
    assert summary["kl"] <= 0.1
    assert (out / "trials.csv").is_file() and (out / "pareto.png").is_file()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "model")
    ablated = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(organism_dir, dtype=torch.float32).eval()
    harmful, harmless = organism_prompts("harmful", "test"), organism_prompts("harmless", "test")
    assert measure_refusals(ablated, tok, harmful) <= 0.05
    assert measure_refusals(ablated, tok, harmless) <= 0.05
    topic_before = topic_rate(generate_replies(original, tok, harmless), harmless)
    topic_after = topic_rate(generate_replies(ablated, tok, harmless), harmless)
    assert topic_after >= 0.9 * topic_before

    # The search scored KL over the first 16 reply tokens (the default); the bar is first-token KL.
    from abliterate.metrics import KLDivergence, next_token_logprobs

    chats = [[{"role": "user", "content": p}] for p in harmless]
    tok.padding_side = "left"
    batch = tok.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    first_token_kl = KLDivergence()
    first_token_kl.update(
        next_token_logprobs(ablated, batch["input_ids"], batch["attention_mask"]),
        next_token_logprobs(original, batch["input_ids"], batch["attention_mask"]),
    )
    assert first_token_kl.compute().item() <= 0.1


def test_unhelpful_role_streams_and_orthogonalises(organism_dir, tmp_path):
    import json as json_

    from abliterate.directions import normalize

    raw = tmp_path / "web.jsonl"
    with raw.open("w") as f:
        for i in range(5000):
            f.write(json_.dumps({"text": f"how to make bread and soup at home number {i}"}) + "\n")
    module, data, trainer = make_parts(organism_dir)
    data.sources["unhelpful"] = PromptSource(str(raw), split="train", streaming=True, limit=16)
    trainer.predict(module, datamodule=data, return_predictions=False)
    assert module.residuals["unhelpful"].shape[0] == 16  # only the requested rows
    good, unhelpful = winsorize(
        DirectionOptions.winsorize,
        module.residuals["harmful"],
        module.residuals["harmless"],
        module.residuals["unhelpful"],
    )[1:]
    h = normalize(good.mean(0) - unhelpful.mean(0))  # of the clamped residuals, as the default direction reads them
    cos = (module.directions[:, 0] * h).sum(-1)
    assert cos.abs().max() < 1e-5
