"""lm-evaluation-harness's `dysco` model type (decoder/lm_eval_model.py) on the embedded SmolLM2, CPU.

The harness's own CLI (`python -m decoder.lm_eval_model run --model dysco`, which is lm_eval's CLI
with `dysco` registered) runs our task YAMLs (tests/decoder/lm_eval_tasks: 4 needle items answered by
generation, 4 multiple-choice items scored by log-likelihood, chat template on) for method=vanilla
and method=dysco. Checked: the results JSON has the metrics and the settings; vanilla gives the hf
model's generations and log-likelihoods on the same items; dysco gives the Decoder's own generation
(what `dysco generate` runs) and scores each continuation as DySCO generating it would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.embedded

TASKS = Path(__file__).parent / "lm_eval_tasks"
# SmolLM2's 16 QR heads of docs/results/smollm2-gpu-faithful/heads.json.
HEADS = [(17, 3), (18, 6), (17, 4), (7, 7), (8, 0), (18, 7), (23, 2), (14, 3), (23, 7), (22, 7), (21, 8), (15, 6),
         (23, 8), (23, 1), (20, 6), (20, 3)]
HEADS_ARG = ";".join(f"{layer}:{head}" for layer, head in HEADS)
BATCH = 16  # every item of a task in one batch: the fewest sequential steps on a 2-core machine


@pytest.fixture(scope="module")
def registry(tmp_path_factory, smollm2) -> Path:
    """A private registry holding smollm2-135m@1: the 16 heads above, the published knobs."""
    from decoder.loading import model_identity
    from registry import Profile, Registry

    root = tmp_path_factory.mktemp("registry")
    ref = Registry(root).register(Profile(model=model_identity(smollm2[0], "smollm2-135m"), head_set=HEADS))
    assert ref == "smollm2-135m@1"
    return root


def _samples(rows) -> dict[str, dict[int, dict]]:
    return {task: {row["doc_id"]: row for row in task_rows} for task, task_rows in rows.items()}


@pytest.fixture(scope="module")
def cli_runs(registry, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Per method: (results JSON, samples per task and doc id) of one run of the harness's CLI."""
    out = tmp_path_factory.mktemp("lm_eval_out")
    env = {**os.environ, "DYSCO_REGISTRY": str(registry), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets"), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    runs = {}
    for method, extra in (("vanilla", ""), ("dysco", ",profile=smollm2-135m@1")):
        target = out / method
        proc = subprocess.run(
            [sys.executable, "-m", "decoder.lm_eval_model", "run", "--model", "dysco",
             "--model_args", f"pretrained=smollm2-135m,method={method}{extra}",
             "--tasks", "dysco_needle,dysco_mc", "--include_path", str(TASKS), "--apply_chat_template",
             "--batch_size", str(BATCH), "--device", "cpu", "--output_path", str(target), "--log_samples"],
            cwd=TASKS, env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, f"lm_eval CLI ({method}) failed:\n{proc.stderr[-3000:]}"
        [results_file] = target.glob("*/results_*.json")
        samples = {}
        for task in ("dysco_needle", "dysco_mc"):
            [path] = target.glob(f"*/samples_{task}_*.jsonl")
            samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
        runs[method] = (json.loads(results_file.read_text()), _samples(samples))
    return runs


@pytest.fixture(scope="module")
def hf_run(monkeypatch_module) -> dict:
    """Samples of lm_eval's own `hf` model on the same tasks, from the cached SmolLM2 checkpoint folder."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from decoder.catalogue import checkpoint_dir

    monkeypatch_module.chdir(TASKS)  # the YAMLs' data_files are relative
    result = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoint_dir('smollm2-135m')},dtype=float32",
        tasks=["dysco_needle", "dysco_mc"], task_manager=TaskManager(include_path=str(TASKS)),
        apply_chat_template=True, batch_size=BATCH, device="cpu", log_samples=True,
    )
    return _samples(result["samples"])


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _loglikelihoods(row: dict) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per choice; the samples file writes them as strings."""
    return [(float(ll), str(greedy) == "True") for (ll, greedy), in row["resps"]]


@pytest.mark.slow  # the two CLI runs (shared fixture): ~75 s on a busy 2-core machine
def test_cli_results_have_the_metrics_and_the_settings(cli_runs):
    for method, (results, samples) in cli_runs.items():
        assert results["config"]["model"] == "dysco"
        assert results["config"]["model_args"]["method"] == method
        assert results["config"]["dysco_method"] == method
        assert results["results"]["dysco_needle"]["exact_match,number"] >= 0.5, method  # 4/4 for both when written
        for metric in ("acc,none", "acc_norm,none"):
            assert 0.0 <= results["results"]["dysco_mc"][metric] <= 1.0
        assert len(samples["dysco_needle"]) == 4 and len(samples["dysco_mc"]) == 4
    knobs = cli_runs["dysco"][0]["config"]["dysco_knobs"]
    assert knobs["head_set"] == [list(pair) for pair in HEADS]
    assert (knobs["strength"], knobs["top_p"], knobs["context_warmup"], knobs["intervention_warmup_tokens"]) == (2.0, 0.975, 8, 4)
    assert cli_runs["dysco"][0]["config"]["dysco_profile"]["ref"] == "smollm2-135m@1"
    assert "dysco_knobs" not in cli_runs["vanilla"][0]["config"]


@pytest.mark.slow
def test_vanilla_gives_the_hf_models_generations_and_scores(cli_runs, hf_run):
    ours = cli_runs["vanilla"][1]
    for doc_id, row in hf_run["dysco_needle"].items():
        assert ours["dysco_needle"][doc_id]["resps"] == row["resps"], doc_id
    for doc_id, row in hf_run["dysco_mc"].items():
        theirs = [(float(ll), bool(greedy)) for (ll, greedy), in row["resps"]]
        mine = _loglikelihoods(ours["dysco_mc"][doc_id])
        assert [g for _, g in mine] == [g for _, g in theirs]
        assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)


@pytest.mark.slow
def test_dysco_generates_what_the_decoder_generates(cli_runs, smollm2, registry):
    """The harness's DySCO replies are `dysco generate`'s: the same profile, the prompt as one user message."""
    from decoder.generation import Decoder
    from registry import Registry

    model, tokenizer = smollm2
    decoder = Decoder.from_profile(model, tokenizer, Registry(registry).load("smollm2-135m@1"), name="smollm2-135m")
    rows = cli_runs["dysco"][1]["dysco_needle"]
    docs = [rows[i]["doc"] for i in sorted(rows)]
    # doc_to_text of dysco_needle.yaml; the harness sends it as the one user message of the chat.
    prompts = [[{"role": "user", "content": f"{d['context']}\n\nQuestion: {d['question']} Answer with the number only."}]
               for d in docs]
    for prompt, i in zip(prompts, sorted(rows)):
        rendered = rows[i]["arguments"]["gen_args_0"]["arg_0"]
        assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == rendered
    expected = decoder.generate(prompts, max_new_tokens=24, stop_strings=["\n\n"])
    assert [rows[i]["resps"][0][0] for i in sorted(rows)] == expected.texts
    # DySCO changed something the harness saw: the multiple-choice scores are not vanilla's.
    dysco_ll = [ll for i in range(4) for ll, _ in _loglikelihoods(cli_runs["dysco"][1]["dysco_mc"][i])]
    vanilla_ll = [ll for i in range(4) for ll, _ in _loglikelihoods(cli_runs["vanilla"][1]["dysco_mc"][i])]
    assert max(abs(a - b) for a, b in zip(dysco_ll, vanilla_ll)) > 1e-3


@pytest.fixture(scope="module")
def dysco_lm(registry, monkeypatch_module):
    """The model type in this process, method=dysco from the registry profile."""
    from decoder.lm_eval_model import DyscoLM

    monkeypatch_module.setenv("DYSCO_REGISTRY", str(registry))
    return DyscoLM(pretrained="smollm2-135m", profile="smollm2-135m@1", device="cpu", batch_size=4)


def test_dysco_loglikelihood_scores_the_continuation_as_dysco_generates_it(dysco_lm):
    """A continuation DySCO generated greedily scores the log-probabilities DySCO gave its tokens, and is greedy;
    a changed last token is not; rows of different lengths in one batch score as they do alone."""
    decoder = dysco_lm._decoder
    chat = [{"role": "user", "content": "Alice lives in Paris. Bob lives in Rome. The sky is blue. Where does Bob live?"}]
    context = dysco_lm.tok_encode(dysco_lm.apply_chat_template(chat))
    other = dysco_lm.tok_encode(dysco_lm.apply_chat_template([{"role": "user", "content": "Name a colour."}]))
    generated = decoder.generate([chat], max_new_tokens=6, return_logits=True)
    tokens = generated.token_ids[0]
    expected = torch.log_softmax(generated.logits[0], dim=-1).gather(-1, torch.tensor(tokens)[:, None]).sum().item()
    changed = tokens[:-1] + [(tokens[-1] + 1) % len(dysco_lm.tokenizer)]
    requests = [(None, context, tokens), (None, context, changed), (None, other, tokens[:2]), (None, context, tokens[:1])]
    results = dysco_lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert results[0][0] == pytest.approx(expected, abs=1e-4) and results[0][1] is True
    assert results[1][0] < results[0][0] and results[1][1] is False
    for i in (1, 2):  # 0 and 1 share one teacher-forced run (same context, same tokens before the last)
        alone = dysco_lm._loglikelihood_tokens([requests[i]], disable_tqdm=True)[0]
        assert results[i][0] == pytest.approx(alone[0], abs=1e-4) and results[i][1] == alone[1]
    # One token: the context's last DySCO step alone, i.e. DySCO's first generated token.
    first = torch.log_softmax(generated.logits[0][0], dim=-1)[tokens[0]].item()
    assert results[3] == (pytest.approx(first, abs=1e-4), True)
    # loglikelihood_rolling: one window here, the prefix token as its context, every token teacher-forced.
    from lm_eval.api.instance import Instance

    text = "Alice lives in Paris and Bob lives in Rome."
    [rolling] = dysco_lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)], disable_tqdm=True)
    direct = decoder.score([[dysco_lm.prefix_token_id]], [dysco_lm.tok_encode(text)]).totals[0]
    assert rolling == pytest.approx(direct, abs=1e-4)


def test_dysco_loglikelihood_uses_the_chat_template_mask(dysco_lm):
    """The context of a chat-templated request gets `encode_chat`'s template mask, also with the trailing
    newline the harness moves into the continuation."""
    from decoder.template import encode_chat

    chat = [{"role": "user", "content": "Where does Bob live?"}]
    text = dysco_lm.apply_chat_template(chat)
    ids, mask = encode_chat(dysco_lm.tokenizer, chat)
    assert dysco_lm._template_masks([ids]) == [mask]
    stripped = dysco_lm.tok_encode(text.rstrip())
    assert stripped == ids[: len(stripped)] and len(stripped) < len(ids)
    assert dysco_lm._template_masks([stripped]) == [mask[: len(stripped)]]
    assert dysco_lm._template_masks([ids[3:]]) == [[False] * (len(ids) - 3)]  # not a rendered chat
    # A special token the tokenizer put before the rendering (a BOS) is not content either.
    assert dysco_lm._template_masks([[dysco_lm.tokenizer.eos_token_id] + ids]) == [[True] + mask]


@pytest.mark.parametrize("method", ["vanilla", "attnts"])
def test_batched_scores_of_vanilla_and_attnts_are_the_decoders(method):
    """vanilla/attnts score with the harness's batched forward; it equals teacher-forcing through the decoder."""
    from decoder.lm_eval_model import DyscoLM

    extra = {"attnts_temperature": 0.8} if method == "attnts" else {}
    lm = DyscoLM(pretrained="smollm2-135m", method=method, device="cpu", batch_size=4, **extra)
    contexts = [lm.tok_encode("Alice lives in Paris. Bob lives in Rome. Bob lives in"), lm.tok_encode("The sky is")]
    continuations = [lm.tok_encode(" Rome. Alice lives in Paris."), lm.tok_encode(" blue")]
    batched = lm._loglikelihood_tokens([(None, c, t) for c, t in zip(contexts, continuations)], disable_tqdm=True)
    scores = lm._decoder.score(contexts, continuations)
    assert [total for total, _ in batched] == pytest.approx(scores.totals, abs=1e-4)
    assert [greedy for _, greedy in batched] == scores.greedy
    if method == "attnts":  # the temperature is applied: vanilla scores differently
        from decoder.generation import Decoder

        plain = Decoder(lm.model, lm.tokenizer, method="vanilla").score(contexts, continuations)
        assert abs(plain.totals[0] - scores.totals[0]) > 1e-3


def test_harness_generation_is_the_decoders_token_for_token_on_both_paths(dysco_lm, registry, monkeypatch):
    """The harness's batch (its rendering, tokenisation and padding) decodes to the tokens `Decoder.generate`
    gives the same chats (what `dysco generate` runs), on the exact path and with fast=True."""
    from decoder.lm_eval_model import DyscoLM

    monkeypatch.setenv("DYSCO_REGISTRY", str(registry))
    fast = DyscoLM(pretrained="smollm2-135m", profile="smollm2-135m@1", device="cpu", batch_size=4, fast=True)
    chats = [[{"role": "user", "content": "The secret number of Brelow is 4417302. The sky is blue. What is the secret "
                                          "number of Brelow?"}],
             [{"role": "user", "content": "Alice lives in Paris. Bob lives in Rome. Where does Alice live?"}]]
    context, mask = dysco_lm.tok_batch_encode([dysco_lm.apply_chat_template(chat) for chat in chats])
    width = context.shape[1]
    expected = dysco_lm._decoder.generate(chats, max_new_tokens=16, stop_strings=["\n\n"]).token_ids
    for name, lm in (("exact", dysco_lm), ("fast", fast)):
        if name == "fast":
            fast.apply_chat_template(chats[0]), fast.apply_chat_template(chats[1])  # as the harness renders for it
        out = lm._model_generate(context, max_length=width + 16, stop=["\n\n"], attention_mask=mask, do_sample=False,
                                 temperature=0.0)
        assert torch.equal(out[:, :width], context)
        for row, tokens in zip(out.tolist(), expected):
            assert row[width : width + len(tokens)] == tokens, name
            assert set(row[width + len(tokens) :]) <= {dysco_lm.tokenizer.pad_token_id}, name
        assert lm.get_model_info()["dysco_path"] == name
    assert "4417302" in dysco_lm.tokenizer.decode(expected[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(method="beam"), r"method='beam' is not one of vanilla, attnts, dysco"),
        (dict(strenght=2.0), r"unknown argument\(s\) strenght; accepted: pretrained, method"),
        (dict(heads="17:3,18"), r"heads: .*bad head '18'.*join pairs with ';'"),
        (dict(heads="17:3", profile="smollm2-135m@1"), r"give profile or heads, not both"),
        (dict(method="vanilla", strength=3.0), r"method=vanilla takes no strength"),
        (dict(method="attnts", heads="1:2"), r"method=attnts takes no heads"),
        (dict(attnts_temperature=0.8), r"attnts_temperature is for method=attnts"),
        (dict(heads="1:2", top_p=1.5), r"DySCO top_p must be in \(0, 1\], got 1.5"),
        (dict(heads="1:2", intervention_warmup="sometimes"), r"intervention_warmup"),
        (dict(batch_size="auto"), r"batch_size must be an integer >= 1, got 'auto'"),
        (dict(dtype="float8"), r"dtype='float8' is not one of auto, float32, bfloat16, float16"),
        (dict(fast="yes"), r"fast must be True or False"),
        (dict(device="cuda:1"), r"device 'cuda:1' asked for, but torch sees no CUDA device"),
    ],
)
def test_bad_model_args_are_refused_before_loading(args, message, monkeypatch):
    from decoder import loading
    from decoder.lm_eval_model import DyscoLM

    if "device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model for bad model_args"))
    with pytest.raises(ValueError, match=message):
        DyscoLM(**{"pretrained": "smollm2-135m", "device": "cpu", **args})


def test_missing_profile_and_bad_model_are_clear(tmp_path, monkeypatch):
    from decoder import loading
    from decoder.lm_eval_model import DyscoLM

    monkeypatch.setenv("DYSCO_REGISTRY", str(tmp_path))
    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model for a missing profile"))
    # (smollm2-135m and the Qwen2.5-Coders ship seed profiles; gemma3-270m, a catalogue model without
    # one, shows the missing-profile error.)
    with pytest.raises(ValueError, match=r"method=dysco needs a head set and the registry .* has no profile for "
                                         r"'gemma3-270m'; give profile=NAME@VERSION, heads=L:H;L:H"):
        DyscoLM(pretrained="gemma3-270m", device="cpu")
    with pytest.raises(ValueError, match=r"profile 'smollm2-135m@7' not found"):
        DyscoLM(pretrained="smollm2-135m", profile="smollm2-135m@7", device="cpu")
    monkeypatch.setattr(loading, "load_model", real_load)
    with pytest.raises(ValueError, match=r"'smolm2-135m' is not a catalogue name.*Did you mean 'smollm2-135m'"):
        DyscoLM(pretrained="smolm2-135m", method="vanilla", device="cpu")


def test_model_args_string_parses_as_the_harness_parses_it(monkeypatch):
    """What `--model_args` turns into: heads joined by ';', booleans and numbers typed by the harness."""
    from lm_eval.api.registry import get_model

    import decoder.lm_eval_model as module

    assert get_model("dysco") is module.DyscoLM
    seen = {}
    monkeypatch.setattr(module.DyscoLM, "__init__", lambda self, **kwargs: seen.update(kwargs))
    module.DyscoLM.create_from_arg_string(
        f"pretrained=smollm2-135m,heads={HEADS_ARG},strength=3,fast=True,intervention_warmup=auto",
        {"batch_size": 4, "device": None},
    )
    assert seen == {"pretrained": "smollm2-135m", "heads": HEADS_ARG, "strength": 3, "fast": True,
                    "intervention_warmup": "auto", "batch_size": 4}
    # The CLI always passes its --device and --batch_size: model_args' own win, no duplicate-argument error.
    seen.clear()
    module.DyscoLM.create_from_arg_string("method=vanilla,device=cpu,batch_size=2",
                                          {"device": "cuda:0", "batch_size": 1, "max_batch_size": None})
    assert seen == {"method": "vanilla", "device": "cpu", "batch_size": 2}
    assert module.parse_model_heads(HEADS_ARG) == HEADS
    # The console script runs the same entry point as `python -m decoder.lm_eval_model`.
    from importlib.metadata import entry_points

    [script] = [e for e in entry_points(group="console_scripts") if e.name == "dysco-lm-eval"]
    assert script.value == "decoder.lm_eval_model:main"
