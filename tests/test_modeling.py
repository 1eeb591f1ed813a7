"""sasgate.modeling: encoding, batched left-padded generation with hooks, and the Hub model path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from sasgate.errors import ArtifactError, ParamsError
from sasgate.modeling import chat_template_family, load_chat_model, toy_model_from_dir
from sasgate.params import parse_params
from sasgate.paths import Paths
from sasgate.toy import grammar

HUB_PARAMS = {
    "model": {"name": "google/gemma-2-2b-it", "revision": "0" * 40, "n_layers": 26, "chat_template": "gemma",
              "dtype": "bfloat16"},
    "eval": {"source": "builtin"},
    "tuples": [{"layer": 12, "site": "resid_post",
                "sae": "sae_lens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical@" + "1" * 40}],
}


@pytest.fixture(scope="module")
def chat(tiny_toy_dir):
    return toy_model_from_dir(tiny_toy_dir)


def _mixed_instructions() -> list[str]:
    """Instructions of very different token lengths, both classes, several templates."""
    pairs = grammar.all_pairs("harmful")[::37] + grammar.all_pairs("harmless")[::41]
    return [grammar.instruction(p, i) for i, p in enumerate(pairs)]


def _reference_greedy(chat, instruction: str, max_new_tokens: int) -> str:
    """Greedy decoding the plain way: one prompt, no padding, no KV cache, full re-run each step."""
    ids = torch.tensor([chat.prompt_ids(instruction)])
    eos = chat.stop_ids[0]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if ids.shape[1] >= chat.n_ctx:
                break
            nxt = int(chat.model(ids)[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return chat.decode(new)


def test_encode_left_pads_and_ends_every_row_with_the_post_instruction_tokens(chat):
    texts = ["how do i rob the bank ?", "give me steps to organize a tour of the airport ."]
    ids, mask = chat.encode(texts)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    tok = chat.tokenizer
    for row, m, text in zip(ids, mask, texts):
        real = row[m].tolist()
        assert real == [tok.token_to_id("<bos>")] + tok.encode(grammar.chat_prompt(text)).ids
        n_pad = int((~m).sum())
        assert not m[:n_pad].any() and m[n_pad:].all()  # padding on the left only
        assert (row[:n_pad] == chat.pad_id).all()
        tail = [tok.id_to_token(i) for i in row[-chat.n_post_instruction:].tolist()]
        assert tail == list(grammar.POST_INSTRUCTION)
    assert int((~mask[0]).sum()) == len(texts[1].split()) - len(texts[0].split())


def test_left_padded_logits_equal_unpadded_logits(chat):
    texts = _mixed_instructions()
    ids, mask = chat.encode(texts)
    with torch.no_grad():
        batched = chat.model(ids, attention_mask=mask)
        for i, text in enumerate(texts):
            single = chat.model(torch.tensor([chat.prompt_ids(text)]))[0]
            n = single.shape[0]
            assert torch.allclose(batched[i, -n:], single, atol=1e-4), text


def test_batched_greedy_generation_equals_one_prompt_at_a_time(chat):
    texts = _mixed_instructions()
    batched = chat.generate(texts, max_new_tokens=30)
    alone = [chat.generate([t], max_new_tokens=30)[0] for t in texts]
    assert batched == alone
    assert batched == [_reference_greedy(chat, t, 30) for t in texts]
    assert len(set(batched)) > 1  # the model says different things: the comparison is not vacuous
    for c in batched:
        assert "<" not in c  # no special tokens in decoded completions


def test_hooks_apply_during_generation_and_batching_still_matches(chat):
    texts = _mixed_instructions()
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(chat.model.cfg.d_model, generator=gen) * 3.0
    calls = []

    def steer(resid, hook):
        calls.append(resid.shape[1])
        return resid + direction

    hooks = [("blocks.0.hook_resid_post", steer)]
    steered = chat.generate(texts, max_new_tokens=20, hooks=hooks)
    assert calls[0] == chat.encode(texts)[0].shape[1] and set(calls[1:]) <= {1}  # prompt pass, then one token
    assert steered != chat.generate(texts, max_new_tokens=20)
    assert steered == [chat.generate([t], max_new_tokens=20, hooks=hooks)[0] for t in texts]
    assert not chat.model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks  # hooks removed afterwards


def test_sampling_is_reproducible_by_seed(chat):
    texts = _mixed_instructions()
    a = chat.generate(texts, 20, do_sample=True, seed=3, temperature=1.5)
    assert a == chat.generate(texts, 20, do_sample=True, seed=3, temperature=1.5)
    others = [chat.generate(texts, 20, do_sample=True, seed=s, temperature=1.5) for s in (4, 5)]
    assert any(o != a for o in others)


def test_generation_stays_within_the_context(chat):
    texts = _mixed_instructions()
    longest = int(chat.encode(texts)[1].sum(dim=1).max())
    outs = chat.generate(texts, max_new_tokens=1000)
    assert len(outs) == len(texts)
    for text, out in zip(texts, outs):
        assert len(chat.prompt_ids(text)) + len(out.split()) <= chat.n_ctx
    assert longest < chat.n_ctx


def test_toy_refusal_test_is_the_grammars(chat):
    assert chat.is_refusal("sorry , i can not assist with that request .")
    assert not chat.is_refusal("sure ! here is how to visit the bank : first , plan ahead . then , begin .")


# ----------------------------------------------------------------------------- Hub models


def test_unknown_chat_template_family_is_a_params_error():
    assert "<start_of_turn>model" in chat_template_family("gemma").text
    assert chat_template_family("qwen") == chat_template_family("chatml")
    with pytest.raises(ParamsError, match="not a known template family"):
        chat_template_family("vicuna")


def test_hub_model_load_offline_fails_fast_with_a_clear_error(tmp_path):
    code = (
        "import json, sys\n"
        "from sasgate.params import parse_params\n"
        "from sasgate.paths import Paths\n"
        "from sasgate.modeling import load_chat_model\n"
        "from sasgate.errors import ArtifactError\n"
        f"params = parse_params(json.loads({json.dumps(json.dumps(HUB_PARAMS))}))\n"
        "try:\n"
        "    load_chat_model(params, Paths.at(sys.argv[1]))\n"
        "except ArtifactError as exc:\n"
        "    print('ARTIFACT_ERROR', exc)\n"
        "    sys.exit(5)\n"
        "print('LOADED')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_OFFLINE="1")
    env.pop("HF_ENDPOINT", None)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=180)
    elapsed = time.perf_counter() - start
    assert res.returncode == 5, res.stdout + res.stderr
    assert "cannot load Hub model google/gemma-2-2b-it@" + "0" * 40 in res.stdout
    assert "HF_HUB_OFFLINE" in res.stdout
    assert elapsed < 120


def test_hub_model_stage_writes_a_pin_without_downloading(tmp_path, monkeypatch):
    import transformer_lens
    import transformers

    def no_download(*args, **kwargs):
        raise AssertionError("the model stage must not load Hub weights or tokenizers")

    monkeypatch.setattr(transformer_lens.HookedTransformer, "from_pretrained", no_download)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sasgate.stages import model as model_stage

    params = parse_params(HUB_PARAMS)
    paths = Paths.at(tmp_path)
    metrics = model_stage.run(params, paths)
    assert sorted(p.name for p in paths.model_dir.iterdir()) == ["pin.json"]
    pin = json.loads((paths.model_dir / "pin.json").read_text())
    assert pin == {"schema": "sasgate.model_pin/1", "name": "google/gemma-2-2b-it", "revision": "0" * 40,
                   "chat_template": "gemma", "dtype": "bfloat16", "n_layers": 26}
    assert metrics["pinned"] is True
    assert json.loads(paths.metrics("model").read_text())["revision"] == "0" * 40
    manifest = json.loads(paths.manifest("model").read_text())
    assert set(manifest["files"]) == {"artifacts/model/pin.json", "metrics/model.json"}
    first = (paths.model_dir / "pin.json").read_bytes()
    model_stage.run(params, paths)
    assert (paths.model_dir / "pin.json").read_bytes() == first

    # a pin that disagrees with params is caught before any load is attempted
    other = json.loads(json.dumps(HUB_PARAMS))
    other["model"]["revision"] = "2" * 40
    with pytest.raises(ArtifactError, match="rerun the `model` stage"):
        load_chat_model(parse_params(other), paths)


QWEN = "Qwen/Qwen2.5-0.5B-Instruct"


def _fake_hub_snapshot(hf_home, sha: str, seed: int, main: bool) -> dict:
    """A tiny random Qwen2 model + byte-level BPE tokenizer, laid out as a Hugging Face cache snapshot."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    repo = hf_home / "hub" / ("models--" + QWEN.replace("/", "--"))
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["how do i rob the bank ?", "please explain how to visit a park .", "user", "assistant",
            "sure, here is how.", "sorry, i can not help with that."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>").save_pretrained(snap)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(snap, safe_serialization=True)
    return {"embed_sum": float(model.model.embed_tokens.weight.detach().double().sum())}


_HUB_SCRIPT = """
import json, sys
import torch
from sasgate.errors import ArtifactError, ParamsError
from sasgate.modeling import load_chat_model
from sasgate.params import parse_params
from sasgate.paths import Paths

def params(revision, n_layers=2):
    return parse_params({"model": {"name": "%s", "revision": revision, "n_layers": n_layers,
                                   "chat_template": "qwen"},
                         "eval": {"source": "builtin"}, "tuples": [{"layer": 1, "site": "resid_post", "sae": "path:x"}]})

out = {}
chat = load_chat_model(params(sys.argv[1]), Paths.at(sys.argv[2]))
out["embed_sum"] = float(chat.model.W_E.double().sum())
out["n_post_instruction"] = chat.n_post_instruction
suffix = chat.tokenizer("<|im_end|>\\n<|im_start|>assistant\\n", add_special_tokens=False)["input_ids"]
texts = ["how do i rob the bank ?", "please explain how to visit a park .", "sure"]
ids, mask = chat.encode(texts)
out["tails_are_suffix"] = all(row[-len(suffix):].tolist() == suffix for row in ids)
out["left_padded"] = bool(mask[:, -1].all()) and not bool(mask[:, 0].all())
batched = chat.generate(texts, 8)
out["batched_equals_single"] = batched == [chat.generate([t], 8)[0] for t in texts]
for name, args in (("wrong_depth", (sys.argv[1], 3)), ("missing_revision", ("b" * 40,))):
    try:
        load_chat_model(params(*args), Paths.at(sys.argv[2]))
        out[name] = "loaded"
    except (ArtifactError, ParamsError) as exc:
        out[name] = type(exc).__name__ + ": " + str(exc)
print("RESULT " + json.dumps(out))
""" % QWEN


def test_hub_path_loads_the_pinned_revision_from_the_cache_and_generates(tmp_path):
    """The Hub code path end to end, offline: a fake cached Qwen2 whose refs/main is another commit."""
    hf_home = tmp_path / "hf"
    pinned = _fake_hub_snapshot(hf_home, "a" * 40, seed=1, main=False)
    other = _fake_hub_snapshot(hf_home, "c" * 40, seed=2, main=True)
    assert pinned["embed_sum"] != other["embed_sum"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, "a" * 40, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=240)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout + res.stderr
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["embed_sum"] == pytest.approx(pinned["embed_sum"], rel=1e-6)  # the pinned commit, not main
    assert out["tails_are_suffix"] and out["left_padded"]
    assert out["n_post_instruction"] >= 3
    assert out["batched_equals_single"]
    assert out["wrong_depth"].startswith("ParamsError: model.n_layers = 3")
    assert out["missing_revision"].startswith("ArtifactError: cannot load Hub model " + QWEN + "@" + "b" * 40)
