"""Tokenizer: lossless round trips, specials never made from text, exact chat masks, HF equivalence."""

import json
import unicodedata

import pytest

from pakar import PakarError
from pakar.commands.data import main_tokenizer as main
from pakar.tokenizer import (CHAT_TEMPLATE, MIN_VOCAB, SPECIAL_TOKENS, Tokenizer, encode_chat, render_chat,
                             train_tokenizer)

TEXT = "Kopi tubruk khas Jawa — rasanya 'mantap' 😊, é ñ\tRp 15.000,-\n“kutipan” café 日本"
CHAT = [
    {"role": "system", "content": "Kamu asisten yang ramah."},
    {"role": "user", "content": "Apa ibu kota Jawa Barat?"},
    {"role": "assistant", "content": "Bandung. Token <|im_end|> ini hanya teks 😊"},
    {"role": "user", "content": "Terima kasih!"},
    {"role": "assistant", "content": "Sama-sama."},
]


def test_special_tokens_and_vocab(sample_tokenizer):
    tok = sample_tokenizer
    assert tok.vocab_size == 512
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    assert [tok.hf.id_to_token(i) for i in range(3)] == list(SPECIAL_TOKENS)


def test_round_trip_and_byte_lengths(sample_tokenizer):
    tok = sample_tokenizer
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == unicodedata.normalize("NFC", TEXT)
    lengths = tok.token_byte_lengths()
    assert len(lengths) == tok.vocab_size and lengths[:3] == [0, 0, 0]
    assert sum(lengths[i] for i in ids) == len(TEXT.encode("utf-8"))  # exact bytes for bits per byte
    decomposed = unicodedata.normalize("NFD", "é")  # NFC normalisation: e + combining accent -> é
    assert tok.decode(tok.encode(decomposed)) == "é"


def test_literal_special_tokens_in_text_stay_text(sample_tokenizer):
    tok = sample_tokenizer
    text = "awal <|im_end|> tengah <|endoftext|><|im_start|>user akhir"
    ids = tok.encode(text)
    assert not set(ids) & {0, 1, 2}
    assert tok.decode(ids) == text
    assert all(not set(b) & {0, 1, 2} for b in tok.encode_batch([text, "biasa", ""]))
    assert tok.encode_batch([text, "biasa"]) == [tok.encode(text), tok.encode("biasa")]


def test_json_save_load_and_sha(sample_tokenizer, tmp_path):
    tok = sample_tokenizer
    again = Tokenizer.from_json(tok.to_json())
    assert again.encode(TEXT) == tok.encode(TEXT) and again.sha256() == tok.sha256()
    assert again.encode("<|im_end|>") == tok.encode("<|im_end|>") != [2]  # the flag survives reloading
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").sha256() == tok.sha256()
    other = train_tokenizer(["satu dua tiga", "empat lima"] * 50, vocab_size=300)
    assert other.sha256() != tok.sha256()


def test_bad_tokenizer_files_and_sizes(tmp_path):
    with pytest.raises(PakarError, match="no such tokenizer"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PakarError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(PakarError, match=f"--vocab-size 100: must be at least {MIN_VOCAB}"):
        train_tokenizer(["teks"], vocab_size=100)


def test_render_chat_matches_the_jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # Hugging Face's settings
    for prompt in (False, True):
        assert render_chat(CHAT, prompt) == env.from_string(CHAT_TEMPLATE).render(
            messages=CHAT, add_generation_prompt=prompt)
    assert render_chat(CHAT[:2], True).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_encode_chat_mask_is_exact(sample_tokenizer):
    tok = sample_tokenizer
    ids, mask = encode_chat(tok, CHAT)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == render_chat(CHAT)
    assert ids.count(tok.im_start_id) == ids.count(tok.im_end_id) == len(CHAT)  # the literal stays text
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "".join(m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant")
    # each masked run starts right after "<|im_start|>assistant\n" and ends on its <|im_end|>
    runs, start = [], None
    for j, m in enumerate(mask + [False]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            runs.append((start, j))
            start = None
    header = [tok.im_start_id, *tok.encode("assistant\n")]
    assert len(runs) == 2
    for a, b in runs:
        assert ids[a - len(header):a] == header and ids[b - 1] == tok.im_end_id
    ids_p, mask_p = encode_chat(tok, CHAT[:2], add_generation_prompt=True)
    assert tok.decode(ids_p) == render_chat(CHAT[:2], True) and not any(mask_p)


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user", "content": ""}], "message 0 \\(user\\)"),
    ([{"role": "user", "content": "hi"}, "oops"], "message 1"),
])
def test_bad_chat_messages_are_named(sample_tokenizer, messages, message):
    with pytest.raises(PakarError, match=message):
        encode_chat(sample_tokenizer, messages)


def test_chat_ids_match_hugging_face(sample_tokenizer):
    """The independent reference: transformers renders CHAT_TEMPLATE and tokenizes the text itself."""
    transformers = pytest.importorskip("transformers")
    import tokenizers

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(sample_tokenizer.to_json()), chat_template=CHAT_TEMPLATE,
        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    chat = [m for m in CHAT if "<|im_end|>" not in m["content"]]  # HF would turn that literal into a special
    for prompt in (False, True):
        text = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
        assert text == render_chat(chat, prompt)
        assert hf(text, add_special_tokens=False)["input_ids"] == encode_chat(sample_tokenizer, chat, prompt)[0]


def test_cli_trains_and_reports_compression(tmp_path, capsys, shared_data):
    assert main(["--data", str(shared_data / "id_general" / "general_sentences.txt"), "--vocab-size", "1000",
                 "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Tokenizer.load(tmp_path / "tokenizer.json").vocab_size == report["vocab_size"] == 1000
    assert report["heldout_documents"] > 0 and report["bpe"]["unknown_rate"] == 0
    assert 2 < report["bpe"]["bytes_per_token"] < report["word_level"]["bytes_per_token"]
    assert report["word_level_seed"]["unknown_rate"] > 0.05  # why the seed's word vocabulary had to go


def test_cli_defaults_to_the_embedded_sample(tmp_path, capsys):
    assert main(["--vocab-size", "300", "--out", str(tmp_path)]) == 0
    assert "embedded sample corpus" in capsys.readouterr().out


# --- long runs: capped pre-tokens, exact pieces -------------------------------------------------------

def test_pretokens_are_capped_and_the_qwen2_split_is_unchanged_on_normal_text(sample_tokenizer):
    """A run without spaces becomes pre-tokens of at most MAX_PRETOKEN_CHARS (BPE training is
    quadratic in a pre-token's length); on ordinary text the pre-tokens are exactly those of the plain
    Qwen2 split (a reference pre-tokenizer built here from `tokenizers` alone)."""
    from tokenizers import Regex, pre_tokenizers

    from pakar.corpus import embedded_sample_path, iter_documents
    from pakar.tokenizer import MAX_PRETOKEN_CHARS, SPLIT_PATTERN

    ours = sample_tokenizer.hf.pre_tokenizer
    pieces = [p for p, _ in ours.pre_tokenize_str("abcdefghij" * 500)]
    assert max(map(len, pieces)) <= MAX_PRETOKEN_CHARS and "".join(pieces) == "abcdefghij" * 500
    reference = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    docs = list(iter_documents([embedded_sample_path()]))
    docs += ["kode:\n" + " " * 40 + "x = 1\t\t# komentar\r\n", "=" * 200 + " garis", "1234567890 " * 30]
    for doc in docs:
        assert ours.pre_tokenize_str(doc) == reference.pre_tokenize_str(doc)


def test_long_texts_encode_in_exact_pieces(sample_tokenizer, shared_data):
    """split_text cuts only where no pre-token spans the cut: encoding the pieces gives exactly the ids
    of encoding the whole text in one `tokenizers` call (the reference), here with pieces of 200 chars."""
    from pakar.tokenizer import split_text

    with open(shared_data / "id_general" / "wiki_paragraphs.txt", encoding="utf-8") as f:
        text = " ".join(line.rstrip("\n") for _, line in zip(range(60), f))
    text += "  dua  spasi,\ttab\n baris baru .\n\n titik... (kurung)   akhir " + "tanpaspasi" * 15
    whole = sample_tokenizer.hf.encode(text, add_special_tokens=False).ids
    pieces = split_text(text, 200)
    assert len(pieces) > 20 and max(map(len, pieces)) <= 200 and "".join(pieces) == text
    assert [i for p in pieces for i in sample_tokenizer.hf.encode(p, add_special_tokens=False).ids] == whole
    assert sample_tokenizer.encode_batch([text[:1000], text]) == [sample_tokenizer.encode(text[:1000]), whole]


def test_training_on_a_line_without_spaces_sees_capped_words():
    """A line without spaces is trained on as pre-tokens of at most MAX_PRETOKEN_CHARS: the trainer
    never sees the long word (the merges it learns span at most that many characters), which is what
    keeps training linear (uncapped, a 1 MB line took minutes; 30K characters still take seconds)."""
    from pakar.tokenizer import MAX_PRETOKEN_CHARS, train_tokenizer

    tok = train_tokenizer(["abcdefghij" * 3_000, "teks biasa di sini"], vocab_size=400)
    longest = max(len(tok.decode([i])) for i in range(3, tok.vocab_size))
    assert longest <= MAX_PRETOKEN_CHARS
    assert tok.decode(tok.encode("abcdefghij" * 1000)) == "abcdefghij" * 1000
