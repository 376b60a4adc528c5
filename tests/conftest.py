"""Shared fixtures.

Fast unit tests use a tiny, randomly initialised Llama model and a byte-level BPE tokenizer
that are built here in code. Integration tests (marked `integration`) use the real embedded
models, loaded once per session.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]

TRAINING_SENTENCES = [
    "You are the hr assistant of the company. Answer the question using only the context.",
    "Employees get 25 vacation days per year and may carry over five days.",
    "The VPN client must be installed before connecting from home.",
    "Invoices above 10,000 EUR need approval by the finance director.",
    "Context: (no documents found)\n\nQuestion: How many days of leave do I get?",
    "system user assistant question answer context documents brief know",
    "Reset your password every 90 days; use at least 12 characters.",
] * 4


# --------------------------------------------------------------------------- tiny parts


def build_tiny_tokenizer():
    """A byte-level BPE (any text encodes, decoding is exact) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_SENTENCES, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(tokenizer, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        # Room for the byte-level tokenizer's long prompts (~4 tokens per word): the request path caps
        # a prompt at the model's window minus the answer. No parameter depends on it.
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        # A wider initialisation than the default 0.02 makes the random model's next token
        # depend visibly on its input, so tests can tell different inputs apart.
        initializer_range=0.5,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def one_torch_thread_per_module():
    """One intra-op thread for a module that asks for it: its models gain nothing from more, and
    on a busy shared machine a second OpenMP thread mostly spin-waits for a core (5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh seeded model per test: tests that check weights stay untouched own theirs."""
    return build_tiny_model(tiny_tokenizer, seed=0)


# --------------------------------------------------------------------------- real parts


@pytest.fixture(scope="session")
def real_settings(tmp_path_factory):
    """Settings defaults (model cache from RAGPT_CACHE_DIR or the user cache), a session index dir
    and an empty session registry."""
    from ragpt.config import Settings

    # An empty registry of the session's own: the repository's prompts/ ships active prompts for
    # the sample departments, which a test must ask for, not get by accident.
    return Settings(index_dir=tmp_path_factory.mktemp("indexes"), prompt_dir=tmp_path_factory.mktemp("prompts"))


@pytest.fixture(scope="session")
def real_embedder(real_settings):
    from ragpt.lm.models import load_embedder

    return load_embedder(real_settings)


@pytest.fixture(scope="session")
def real_generator(real_settings):
    """(model, tokenizer) of the embedded generator; converted from GGUF once if not cached."""
    from ragpt.lm.models import load_generator_model

    return load_generator_model(real_settings)


@pytest.fixture(scope="session")
def sample_index(real_settings, real_embedder):
    """The shipped sample corpus, one ingest per department, in the session index dir."""
    from ragpt.data.ingest import ingest
    from ragpt.data.sample import SAMPLE_DEPARTMENTS, department_dir

    name = "sample"
    for dept in SAMPLE_DEPARTMENTS:
        ingest(
            real_settings.index_dir, name, [department_dir(dept)], [dept], real_embedder,
            source_root=department_dir(dept).parent,  # sources keep the department folder: "hr/vacation-policy.txt"
            chunk_tokens=real_settings.chunk_tokens, chunk_overlap=real_settings.chunk_overlap,
            batch_size=real_settings.embed_batch_size, progress=False,
        )
    return real_settings, name


def write(path: Path, text: str | bytes) -> Path:
    """Write a fixture file (creating folders) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a live test server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app) -> Iterator[str]:
    """uvicorn serving `app` on 127.0.0.1 in a thread; its URL; stopped when the block ends (bounded waits)."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(1200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
