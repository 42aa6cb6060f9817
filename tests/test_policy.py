"""Tests of the tiny policy, checkpoint I/O and the supervised warm-up."""

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.config import SFTParams, TinyModelParams
from pipeline_lib.policy.checkpoint import load_policy, save_policy
from pipeline_lib.policy.sft import IGNORE_INDEX, build_sft_batch, run_sft, sampling_probabilities
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import CHARACTERS, build_char_tokenizer
from pipeline_lib.prompts import PromptSet, encode_prompts
from pipeline_lib.rewards.sampling import sample_rewards
from pipeline_lib.rollout.base import SamplingConfig
from pipeline_lib.rollout.hf_engine import HFGenerateEngine

TEXT = "  12+ 345=357"


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_char_tokenizer()


def test_tokenizer_gives_one_token_per_character_and_round_trips():
    tokenizer = build_char_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    assert len(ids) == len(TEXT)  # no BOS/EOS added
    assert [tokenizer.decode([i]) for i in ids] == list(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True) == TEXT
    assert len(tokenizer) == len(CHARACTERS) + 3


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=CHARACTERS, max_size=40))
def test_any_text_over_the_alphabet_is_one_token_per_character_and_round_trips(
    char_tokenizer, text
):
    tokenizer = char_tokenizer
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_tokenizer_reloads_identically_alone_and_next_to_a_qwen2_config(tmp_path):
    """transformers 5 rebuilds the tokenizer of a "qwen2" checkpoint as Qwen2Tokenizer."""
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(tmp_path / "alone")
    save_policy(
        build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1)), tokenizer, tmp_path / "p"
    )
    texts = [TEXT, "  1+  2=3<eos>", "12 + 3 = 15", "999*  9=8991"]
    for directory in (tmp_path / "alone", tmp_path / "p"):
        loaded = transformers.AutoTokenizer.from_pretrained(directory)
        assert len(loaded) == len(tokenizer)
        assert (loaded.eos_token_id, loaded.pad_token_id) == (1, 0)
        for text in texts:
            ids = loaded(text)["input_ids"]
            assert ids == tokenizer(text)["input_ids"]
            assert loaded.decode(ids) == text


def test_tiny_model_has_about_a_million_parameters_and_tokenizer_ids():
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TinyModelParams())
    assert 1.0e6 < model.num_parameters() < 1.1e6
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_same_seed_builds_identical_weights():
    tokenizer = build_char_tokenizer()
    first = build_tiny_qwen2(tokenizer, TinyModelParams(), seed=7)
    second = build_tiny_qwen2(tokenizer, TinyModelParams(), seed=7)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_saved_policy_loads_with_auto_classes_and_gives_identical_logits(tmp_path):
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1), seed=1).eval()
    directory = save_policy(model, tokenizer, tmp_path / "policy")
    assert (directory / "model.safetensors").is_file()
    assert (directory / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    auto_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert auto_tokenizer.decode(auto_tokenizer(TEXT)["input_ids"]) == TEXT
    assert auto_tokenizer.eos_token == tokenizer.eos_token
    assert auto_tokenizer.pad_token_id == tokenizer.pad_token_id
    auto_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    loaded_model, loaded_tokenizer = load_policy(str(directory))
    input_ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids).logits
        assert torch.equal(auto_model(input_ids).logits, expected)
        assert torch.equal(loaded_model(input_ids).logits, expected)
    assert loaded_tokenizer(TEXT)["input_ids"] == input_ids[0].tolist()


def test_save_policy_replaces_an_existing_checkpoint(tmp_path):
    tokenizer = build_char_tokenizer()
    old = build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1), seed=1)
    new = build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1), seed=2)
    save_policy(old, tokenizer, tmp_path / "policy")
    save_policy(new, tokenizer, tmp_path / "policy")
    loaded, _ = load_policy(str(tmp_path / "policy"))
    assert torch.equal(loaded.model.embed_tokens.weight, new.model.embed_tokens.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]


def test_loss_mask_covers_only_answer_tokens_and_eos():
    tokenizer = build_char_tokenizer()
    batch = build_sft_batch(tokenizer, ["  7+  5=", " 12*  3="], ["12", "36"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert batch["input_ids"].shape == (2, 11)
    for row, answer in enumerate(["12", "36"]):
        labels = batch["labels"][row]
        assert (labels[:8] == IGNORE_INDEX).all()
        assert tokenizer.decode(labels[8:10]) == answer
        assert labels[10] == eos
    padded = build_sft_batch(tokenizer, ["  7+  5=", "  1+  1="], ["12", "2"])
    assert padded["labels"][1].tolist()[8:] == [tokenizer.convert_tokens_to_ids("2"), eos, -100]
    assert padded["input_ids"][1, -1] == pad and padded["attention_mask"][1, -1] == 0


def test_sampling_probabilities_give_each_level_its_weighted_share():
    probabilities = sampling_probabilities([1, 1, 1, 2], {1: 1.0, 2: 3.0})
    assert probabilities.tolist() == [1 / 12, 1 / 12, 1 / 12, 3 / 4]


def test_a_few_sft_steps_reduce_the_loss_on_a_tiny_batch():
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=2), seed=0)
    problems, answers, levels = ["  7+  5=", " 12+  3=", " 11*  4="], ["12", "15", "44"], [1, 2, 6]
    batch = build_sft_batch(tokenizer, problems, answers)
    with torch.no_grad():
        before = model(**batch).loss.item()
    config = SFTParams(steps=25, batch_size=8, warmup_steps=1)
    metrics = run_sft(
        model, tokenizer, problems, answers, levels, config, seed=0, num_threads=1, progress=False
    )
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < 0.5 * before
    assert metrics["sft/steps"] == 25
    # Greedy completions through the rollout interface, graded by rewards.py.
    prompts = PromptSet(["a", "b", "c"], encode_prompts(tokenizer, problems), answers)
    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0)
    rewards = sample_rewards(HFGenerateEngine(model, tokenizer), prompts, greedy, 1, "last_number")
    assert rewards.tolist() == [[1.0], [1.0], [1.0]]


def test_sft_stops_at_the_first_check_that_reaches_the_target():
    """The operating point is an accuracy, not a step count: stop at the first check >= target,
    each check sees the model in eval mode without autograd, training resumes after it."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1), seed=0)
    problems, answers, levels = ["  7+  5=", " 12+  3="], ["12", "15"], [1, 2]
    seen = []

    def validate(step):
        seen.append((step, model.training, torch.is_grad_enabled()))
        return {5: 0.1, 10: 0.3, 15: 0.45}.get(step, 0.9)

    config = SFTParams(steps=50, batch_size=4, target_accuracy=0.4, check_every=5)
    metrics = run_sft(
        model,
        tokenizer,
        problems,
        answers,
        levels,
        config,
        num_threads=1,
        progress=False,
        validate=validate,
    )
    assert seen == [(5, False, False), (10, False, False), (15, False, False)]
    assert metrics["sft/steps"] == 15
    assert metrics["sft/stop_accuracy"] == 0.45 and metrics["sft/target_reached"] == 1.0


def test_sft_that_never_reaches_the_target_says_so():
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1), seed=0)
    config = SFTParams(steps=6, batch_size=2, target_accuracy=0.9, check_every=3)
    metrics = run_sft(
        model,
        tokenizer,
        ["  1+  1="],
        ["2"],
        [1],
        config,
        num_threads=1,
        progress=False,
        validate=lambda step: 0.2,
    )
    assert metrics["sft/steps"] == 6
    assert metrics["sft/target_reached"] == 0.0 and metrics["sft/stop_accuracy"] == 0.2
