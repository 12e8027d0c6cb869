"""`dsv4 generate`: greedy tokens and prompt log-probabilities equal what the model's own logits give,
decoding stops at data.eos_token_ids, and the rows padding the vocabulary are never chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300  # padded to 384: the output layer has 84 padding rows
PROMPT = [35, 105, 109, 112, 111, 114, 116, 32, 111, 115]
STEPS = 6


def _spec(*overrides):
    from dsv4cli.spec.load import load_spec

    return load_spec(REPO / "specs" / "tiny.toml", [f"model.vocab_size={VOCAB}", *overrides])


def _logits(model, ids):
    """[len(ids), padded vocab] logits of the model, straight from its forward."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), attention_mask=None)
    return out[0].float()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, cpu_compat):
    """A freshly built tiny model whose padding rows would win every argmax, saved; plus the greedy
    tokens and prompt log-probabilities computed from its logits directly."""
    from dsv4cli.build.parallel import build_model_chunks, single_process
    from dsv4cli.ckpt.save import TrainProgress, save_checkpoint
    from dsv4cli.spec.layout import ParallelDims
    from dsv4cli.spec.load import spec_to_toml

    spec = _spec()
    root = tmp_path_factory.mktemp("gen") / "ckpt"
    with single_process(spec, seed=7):
        model = build_model_chunks(spec)[0]
        model.eval()
        with torch.no_grad():
            w = model.output_layer.weight
            first = _logits(model, PROMPT)[-1, :VOCAB]
            w[VOCAB:] = 1000.0 * w[int(first.argmax())]  # a padding row scoring 1000x the best real one
        logits = _logits(model, PROMPT)
        assert int(logits[-1].argmax()) >= VOCAB, "padding rows must be the argmax over the padded vocabulary"
        logprobs = torch.log_softmax(logits[:-1, :VOCAB].double(), -1).gather(
            1, torch.tensor(PROMPT[1:]).unsqueeze(1)).squeeze(1).tolist()
        seq, greedy = list(PROMPT), []
        for _ in range(STEPS):
            token = int(_logits(model, seq)[-1, :VOCAB].argmax())
            greedy.append(token)
            seq.append(token)
        layout = ParallelDims.of(spec, 1).checkpoint_layout()
        save_checkpoint(root, [model], None, None, TrainProgress(), spec_to_toml(spec), layout)
    spec_file = root.parent / "tiny-300.toml"
    spec_file.write_text(spec_to_toml(spec))
    return {"root": root, "spec": spec, "spec_file": spec_file, "greedy": greedy, "logprobs": logprobs}


def _run(*args):
    from dsv4cli.cli import app

    return CliRunner().invoke(app, ["generate", *map(str, args)])


def test_greedy_tokens_and_prompt_logprobs_equal_the_models_own_logits(saved):
    from dsv4cli.infer.generate import Sampling, generate

    out = generate(saved["spec"], str(saved["root"]), PROMPT, Sampling(max_new_tokens=STEPS))
    assert out["tokens"] == saved["greedy"]
    assert all(t < VOCAB for t in out["tokens"])
    assert len(out["prompt_logprobs"]) == len(PROMPT) - 1
    assert out["prompt_logprobs"] == pytest.approx(saved["logprobs"], abs=1e-5)
    assert isinstance(out["text"], str)  # the byte tokenizer decodes


def test_decoding_stops_after_an_eos_token(saved):
    from dsv4cli.infer.generate import Sampling, generate

    greedy = saved["greedy"]
    stop = next(i for i in range(1, STEPS) if greedy[i] not in greedy[:i])  # first occurrence of a new id
    spec = _spec(f"data.eos_token_ids=[{greedy[stop]}]")
    out = generate(spec, str(saved["root"]), PROMPT, Sampling(max_new_tokens=STEPS))
    assert out["tokens"] == greedy[: stop + 1]


def test_cli_json_prints_generated_ids_text_and_prompt_logprobs(saved):
    result = _run(saved["spec_file"], "--load", saved["root"], "--tokens", ",".join(map(str, PROMPT)),
                  "--max-new-tokens", STEPS, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"tokens", "text", "prompt_logprobs"}
    assert out["tokens"] == saved["greedy"]
    assert out["prompt_logprobs"] == pytest.approx(saved["logprobs"], abs=1e-5)


def test_cli_prompt_text_is_encoded_by_the_spec_tokenizer_and_sampling_is_seeded(saved):
    text = bytes(PROMPT).decode()
    args = (saved["spec_file"], "--load", saved["root"], "--prompt", text, "--max-new-tokens", 4,
            "--temperature", "1.0", "--top-p", "0.9", "--seed", 3, "--json")
    first, second = _run(*args), _run(*args)
    assert first.exit_code == 0, first.output
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, second))
    assert a["tokens"] == b["tokens"] and all(t < VOCAB for t in a["tokens"])
    assert a["prompt_logprobs"] == pytest.approx(saved["logprobs"], abs=1e-5)  # same ids as PROMPT


def test_cli_bad_arguments_exit_2_with_one_line(saved):
    both = _run(saved["spec_file"], "--load", saved["root"], "--prompt", "x", "--tokens", "1,2")
    assert both.exit_code == 2 and "exactly one of" in both.output
    out_of_vocab = _run(saved["spec_file"], "--load", saved["root"], "--tokens", f"1,{VOCAB}")
    assert out_of_vocab.exit_code == 2 and "token ids" in out_of_vocab.output
    missing = _run(saved["spec_file"], "--load", saved["root"].parent / "nothing", "--tokens", "1,2")
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_top_p_zero_keeps_the_most_likely_token(saved):
    """A nucleus of probability 0 still holds the top token: sampling then equals greedy decoding."""
    from dsv4cli.infer.generate import Sampling, generate

    out = generate(saved["spec"], str(saved["root"]), PROMPT,
                   Sampling(max_new_tokens=STEPS, temperature=1.0, top_p=0.0, seed=1))
    assert out["tokens"] == saved["greedy"]
