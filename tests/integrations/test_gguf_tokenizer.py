"""The GGUF tokenizer cache (pyquant/integrations/gguf_tokenizer.py): a cached
tokenizer is the one transformers converts, token for token; a damaged entry
is converted again; a cache that cannot be written is skipped."""
import os
import pydoc_data.topics

import pytest

from tests.deps import require, smollm2_gguf

transformers = require("transformers")
require("gguf")  # transformers' GGUF vocabulary conversion

from pyquant.integrations import gguf_tokenizer as gt  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted():
    """(path, tokenizer) as transformers converts it, without pyquant's cache."""
    path = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     local_files_only=True)
    return path, tok


@pytest.fixture
def conversions(monkeypatch, converted):
    """Counts transformers' GGUF conversions, each answered with the module's converted tokenizer."""
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def from_pretrained(name, *args, **kwargs):
        if kwargs.get("gguf_file"):
            calls.append(name)
            return converted[1]
        return real(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    return calls


def _same_tokenizer(a, b):
    text = "\n".join(sorted(pydoc_data.topics.topics.values())[:40])
    assert a.encode(text) == b.encode(text)
    assert a.decode(a.encode(text)) == b.decode(b.encode(text))
    assert len(a) == len(b) and a.get_vocab() == b.get_vocab()
    assert (a.bos_token, a.eos_token, a.pad_token, a.unk_token) == (b.bos_token, b.eos_token, b.pad_token, b.unk_token)
    chat = [{"role": "user", "content": "What does a GIL protect?"}]
    assert a.apply_chat_template(chat, tokenize=False) == b.apply_chat_template(chat, tokenize=False)


def test_second_load_reads_the_cache_and_matches_the_conversion(monkeypatch, tmp_path, converted, conversions):
    monkeypatch.setenv("PYQUANT_CACHE_DIR", str(tmp_path))
    path, fresh = converted
    first = gt.gguf_tokenizer(path)
    assert len(conversions) == 1
    (entry,) = os.listdir(os.path.join(tmp_path, "gguf-tokenizers"))
    second = gt.gguf_tokenizer(path)
    assert len(conversions) == 1, "the second load converted again"
    assert os.path.samefile(second.name_or_path, os.path.join(tmp_path, "gguf-tokenizers", entry))
    _same_tokenizer(first, fresh)
    _same_tokenizer(second, fresh)


def test_a_damaged_entry_is_converted_again(monkeypatch, tmp_path, converted, conversions):
    monkeypatch.setenv("PYQUANT_CACHE_DIR", str(tmp_path))
    path, fresh = converted
    gt.gguf_tokenizer(path)
    (entry,) = os.listdir(os.path.join(tmp_path, "gguf-tokenizers"))
    with open(os.path.join(tmp_path, "gguf-tokenizers", entry, "tokenizer.json"), "w") as f:
        f.write("{not json")
    _same_tokenizer(gt.gguf_tokenizer(path), fresh)
    assert len(conversions) == 2
    _same_tokenizer(gt.gguf_tokenizer(path), fresh)  # the entry was replaced
    assert len(conversions) == 2


def test_an_unwritable_cache_is_skipped(monkeypatch, tmp_path, converted, conversions):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PYQUANT_CACHE_DIR", str(blocker))  # a file: no folder can be made under it
    path, fresh = converted
    _same_tokenizer(gt.gguf_tokenizer(path), fresh)
    _same_tokenizer(gt.gguf_tokenizer(path), fresh)
    assert len(conversions) == 2
