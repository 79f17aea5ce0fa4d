"""OpenAI's API for generators, through the `openai` SDK (sync and async, streamed and not) and curl-style
HTTP: completions and chat give the answers kiln gives on every other protocol, token for token; chat
templates render as `transformers`' `apply_chat_template`; bad input gets OpenAI's error shape naming the
field, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from kiln.runtime import pipeline
from kiln.runtime.errors import InvalidInput
from kiln.runtime.generation.chat import ChatTemplate, load_chat_template
from servers import LAYOUTS, metric, running_server

# ChatML, with the tokenizer's bos token and a check that refuses a conversation the model cannot take
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You write Korean news titles."},
    {"role": "user", "content": "Seoul stocks"},
]


@pytest.fixture(scope="module")
def packages(generator_package, exported):
    return {
        "gpt": generator_package("gpt2"),
        "sum": generator_package("bart"),
        "qwen": generator_package("qwen2"),
        "emb": exported("bert", "feature-extraction"),
    }


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chatml.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module", **LAYOUTS)
def server(packages, template_file, request):
    """One process, and two front-ends before an engine: the OpenAI routes answer alike on both."""
    flags = ("--chat-template", str(template_file), "--max-cache-tokens", "16384", "--frontends", request.param)
    with running_server(*flags, models=packages) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)


def rendered(packages, template_file) -> str:
    template = load_chat_template(packages["gpt"], template_file)
    assert template is not None
    return template.render(MESSAGES)


def test_the_chat_template_renders_tokens_as_transformers_does(generator_model, template_file, packages):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(generator_model("gpt2"))
    tokenizer.chat_template = TEMPLATE
    theirs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    generator = pipeline(packages["gpt"]).generator
    text = load_chat_template(packages["gpt"], template_file).render(MESSAGES)
    assert generator.tokenize(text, False, special_tokens=False)[0] == list(theirs)
    assert text == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    without = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert load_chat_template(packages["gpt"], template_file).render(MESSAGES, add_generation_prompt=False) == without


def test_a_template_is_sandboxed_and_its_refusals_are_the_callers_errors():
    """Jinja2's immutable sandbox: no mutation, no dunder access; raise_exception is a 400, not a 500."""
    for source in ("{{ messages.append(1) }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}"):
        with pytest.raises(InvalidInput, match="refused the messages"):
            ChatTemplate(source, "test", {}).render(MESSAGES)
    with pytest.raises(InvalidInput, match="roles are system, user and assistant"):
        ChatTemplate(TEMPLATE, "test", {"bos_token": "<s>"}).render([{"role": "tool", "content": "x"}])


def test_completions_equal_every_other_protocol(client, server, packages):
    ours = pipeline(packages["gpt"])("Seoul stocks", max_new_tokens=12, do_sample=False, return_full_text=False)
    answer = client.completions.create(model="gpt", prompt="Seoul stocks", max_tokens=12, temperature=0)
    assert answer.choices[0].text == ours[0]["generated_text"]
    assert answer.object == "text_completion" and answer.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(pipeline(packages["gpt"]).generator.tokenize("Seoul stocks", False)[0])
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens == prompt_tokens
    body = {"text_input": "Seoul stocks", "max_tokens": 12, "parameters": {"do_sample": False}}
    triton = _post(f"{server.http}/v2/models/gpt/generate", body)[1]
    assert triton["text_output"] == "Seoul stocks" + answer.choices[0].text  # Triton's echoes the prompt
    echoed = client.completions.create(model="gpt", prompt="Seoul stocks", max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == triton["text_output"]


def test_streamed_completions_add_up_and_report_usage(client):
    whole = client.completions.create(model="gpt", prompt=["Seoul stocks", "Heavy rain"], max_tokens=10, temperature=0)
    stream = client.completions.create(
        model="gpt", prompt=["Seoul stocks", "Heavy rain"], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts, finished, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_sync_and_async_streamed_and_not(client, server, packages, template_file):
    from openai import AsyncOpenAI

    prompt = rendered(packages, template_file)
    ours = pipeline(packages["gpt"])(prompt, max_new_tokens=12, do_sample=False, return_full_text=False,
                                      add_special_tokens=False)[0]["generated_text"]  # fmt: skip
    answer = client.chat.completions.create(model="gpt", messages=MESSAGES, max_completion_tokens=12, temperature=0)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == ours
    assert answer.object == "chat.completion"

    async def streamed() -> tuple[str, str | None, str]:
        async_client = AsyncOpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)
        stream = await async_client.chat.completions.create(
            model="gpt", messages=MESSAGES, max_tokens=12, temperature=0, stream=True
        )
        role, text, reason = None, "", None
        async for chunk in stream:
            delta = chunk.choices[0].delta
            role = role or delta.role
            text += delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        whole = await async_client.chat.completions.create(model="gpt", messages=MESSAGES, max_tokens=12, temperature=0)
        assert whole.choices[0].message.content == text
        return role, reason, text

    role, reason, text = asyncio.run(streamed())
    assert (role, text) == ("assistant", ours) and reason in ("stop", "length")


def test_a_qwen2_chat_is_answered_as_transformers_answers_it(client, generator_model, packages):
    """The package's own template (Qwen2-Instruct's, not the server's --chat-template): the prompt's
    tokens are apply_chat_template's, and the answer is the transformers pipeline's, token for token."""
    from transformers import AutoTokenizer
    from transformers import pipeline as hf_pipeline

    tokenizer = AutoTokenizer.from_pretrained(generator_model("qwen2"))
    chat = hf_pipeline("text-generation", model=str(generator_model("qwen2")), device="cpu")
    generator = pipeline(packages["qwen"]).generator
    for words in ("Stocks rally", "Oil prices", "서울 지하철"):
        messages = [{"role": "user", "content": words}]
        prompt = generator.chat_template.render(messages)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert generator.tokenize(prompt, False, special_tokens=False)[0] == list(ids)
        theirs = chat(messages, do_sample=False, max_new_tokens=24)[0]["generated_text"][-1]["content"]
        ours = client.chat.completions.create(model="qwen", messages=messages, max_tokens=24, temperature=0)
        assert ours.choices[0].message.content == theirs, words
    assert theirs and ours.choices[0].finish_reason in ("stop", "length")


def test_n_choices_with_a_seed_differ_and_repeat(client):
    ask = {"model": "gpt", "prompt": "Seoul", "max_tokens": 8, "temperature": 1.5, "n": 4, "seed": 7}
    first = client.completions.create(**ask)
    again = client.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1


def test_completions_on_a_seq2seq_model_take_the_prompt_as_source(client, packages):
    story = "Seoul stocks rose on Monday as chip makers gained. The central bank held rates."
    ours = pipeline(packages["sum"])(story, max_new_tokens=20)[0]["summary_text"]  # 4 beams, as the pipeline
    assert client.completions.create(model="sum", prompt=story, max_tokens=20).choices[0].text == ours


def test_models_lists_every_served_model_with_its_task(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"gpt", "sum", "qwen", "emb"}
    assert models["gpt"].owned_by == "kiln" and models["gpt"].model_extra["task"] == "text-generation"


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("completions", {"model": "nope", "prompt": "x"}, 404, None),
        ("completions", {"model": "gpt", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("completions", {"model": "gpt", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
        ("completions", {"model": "gpt", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ("completions", {"model": "gpt", "prompt": "x", "n": 2, "temperature": 0}, 400, "n"),
        ("completions", {"model": "gpt", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
        ("completions", {"model": "gpt", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
        ("completions", {"model": "gpt", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ("completions", {"model": "gpt", "prompt": "word " * 400}, 400, "prompt"),
        ("completions", {"model": "gpt", "prompt": [1, 2, 3]}, 400, "prompt"),
        ("completions", {"model": "emb", "prompt": "x"}, 400, "model"),
        ("completions", {"model": "sum", "prompt": "x", "echo": True}, 400, "echo"),
        ("chat/completions", {"model": "gpt", "messages": [{"role": "user"}]}, 400, "messages"),
        ("chat/completions", {"model": "gpt", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
        ("chat/completions", {"model": "gpt", "messages": []}, 400, "messages"),
        ("chat/completions", {"model": "gpt", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    ],
)
def test_bad_input_gets_openai_errors_naming_the_field(server, route, body, status, param):
    got, answer = _post(f"{server.http}/v1/{route}", body)
    assert got == status, answer
    error = answer["error"]
    assert error["param"] == param and error["message"] and error["type"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_chat_without_a_template_is_refused_naming_the_remedy(packages):
    """The tiny BART has no chat template of its own (the server above gives every generator one)."""
    from kiln.runtime.serve import openai_codec
    from kiln.runtime.serve.batcher import BatchOptions
    from kiln.runtime.serve.generative import GenerativeModel
    from kiln.runtime.serve.metrics import Metrics
    from kiln.runtime.session import SessionOptions

    model = GenerativeModel("sum", packages["sum"], SessionOptions(), BatchOptions(), Metrics())
    try:
        with pytest.raises(openai_codec.OpenAiInvalid, match="--chat-template") as error:
            openai_codec.read_chat({"model": "sum", "messages": MESSAGES}, model)
        assert error.value.param == "messages"
    finally:
        model.stop()


def test_the_sdk_raises_its_own_errors_and_the_server_keeps_serving(client):
    import openai

    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="gpt", prompt="x", max_tokens=0)
    assert "max_new_tokens" in error.value.message or "max_tokens" in error.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert client.completions.create(model="gpt", prompt="Seoul", max_tokens=4, temperature=0).choices[0].text


def test_a_client_that_disconnects_mid_stream_frees_its_rows(server):
    port = int(server.http.rsplit(":", 1)[1])
    body = json.dumps({"model": "gpt", "prompt": "Seoul", "max_tokens": 110, "min_tokens": 110, "n": 3,
                       "temperature": 1.0, "stream": True}).encode()  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    deadline = time.monotonic() + 10
    while metric(server.metrics_url, "kiln_kv_cache_tokens", model="gpt") > 0:
        assert time.monotonic() < deadline, "a stream whose client left still holds the KV cache"
        time.sleep(0.05)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
