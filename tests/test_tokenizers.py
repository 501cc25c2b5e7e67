"""Tokenizers: SigLIP conventions (sticky EOS, pad with EOS) for every kind, and the trainer tool."""
import json
import os

import numpy as np
import pytest

from siglip_jax.data import tokenizers
from siglip_jax.data.tokenizers import train_sentencepiece

CAPTIONS = [
    "A dog runs on the beach .", "Two children are playing in the snow .",
    "A man rides a red bicycle down the street .", "A black dog jumps over a log .",
    "A woman in a blue dress is smiling .", "Three people walk along the river .",
    "A little girl climbs a tree .", "A brown dog is swimming in a lake .",
] * 20


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    train_sentencepiece(CAPTIONS, path, vocab_size=60, model_type="unigram")
    return str(path)


def _pieces_to_text(processor, ids):
    """Independent detokenizer: the pieces themselves, with "▁" marking word starts."""
    return "".join(processor.id_to_piece(int(i)) for i in ids).replace("\u2581", " ").strip()


# ---------------------------------------------------------------------------------- byte

def test_byte_tokenizer_unchanged():
    tokenizer = tokenizers.make_tokenizer("byte", max_len=6)
    ids = tokenizer(["ab", "abcdefgh"])
    np.testing.assert_array_equal(ids, [[100, 101, 1, 1, 1, 1], [100, 101, 102, 103, 104, 1]])
    assert ids.dtype == np.int32 and tokenizer.vocab_size == 259


# ------------------------------------------------------------------------ sentencepiece

def test_sentencepiece_conventions(sentencepiece_model):
    tokenizer = tokenizers.make_tokenizer("sentencepiece", max_len=8, path=sentencepiece_model)
    assert (tokenizer.eos_id, tokenizer.pad_id) == (1, 1)  # T5/c4_en ids, padded with EOS
    assert tokenizer.vocab_size == 60
    ids = tokenizer(["A dog .", CAPTIONS[2], ""])
    assert ids.shape == (3, 8) and ids.dtype == np.int32
    short = tokenizer.encode("A dog .")
    np.testing.assert_array_equal(ids[0], short + [1] * (8 - len(short)))
    assert ids[1, -1] == 1 and (ids[1, :-1] != 1).all()  # truncated, EOS kept at the end
    np.testing.assert_array_equal(ids[2], [1] * 8)


def test_sentencepiece_ids_spell_the_caption(sentencepiece_model):
    tokenizer = tokenizers.SentencePieceTokenizer(sentencepiece_model, max_len=64)
    for caption in CAPTIONS[:8]:
        row = tokenizer([caption])[0]
        content = row[: list(row).index(tokenizer.eos_id)]
        assert _pieces_to_text(tokenizer.processor, content) == caption
        assert tokenizer.decode(row) == caption


def test_sentencepiece_batch_equals_the_libraries_own_batch_encoding(sentencepiece_model):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    tokenizer = tokenizers.SentencePieceTokenizer(sentencepiece_model, max_len=10, lowercase=True)
    texts = [caption.upper() for caption in CAPTIONS[:8]] + ["", "dog"]
    expected = np.full((len(texts), 10), tokenizer.eos_id, np.int32)
    for row, ids in enumerate(processor.encode([text.lower() for text in texts], out_type=int)):
        ids = ids[:9] + [tokenizer.eos_id]
        expected[row, : len(ids)] = ids
    np.testing.assert_array_equal(tokenizer(texts), expected)


def test_sentencepiece_lowercase(sentencepiece_model):
    lower = tokenizers.SentencePieceTokenizer(sentencepiece_model, max_len=16, lowercase=True)
    plain = tokenizers.SentencePieceTokenizer(sentencepiece_model, max_len=16)
    np.testing.assert_array_equal(lower(["A DOG Runs"]), plain(["a dog runs"]))


def test_sentencepiece_reads_ids_from_the_model(tmp_path):
    import sentencepiece

    path = tmp_path / "llama_style.model"
    with open(path, "wb") as model:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(CAPTIONS), model_writer=model, vocab_size=50,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    by_eos = tokenizers.SentencePieceTokenizer(path, max_len=6)
    by_pad = tokenizers.SentencePieceTokenizer(path, max_len=6, pad_with="pad")
    assert (by_eos.eos_id, by_eos.pad_id, by_pad.pad_id) == (2, 2, 3)
    assert by_pad(["dog"])[0, -1] == 3


def test_train_tokenizer_cli_on_a_caption_file(tmp_path):
    from tools import train_tokenizer

    image_dir, captions_file = _caption_folder(tmp_path, CAPTIONS[:40])
    output = tmp_path / "new_folder" / "cli.model"  # made by the tool (a fresh ~/.cache has none)
    train_tokenizer.main(["--source", "caption_folder", "--arg", f"image_dir={image_dir}",
                          "--arg", f"captions_file={captions_file}",
                          "--vocab_size", "45", "--output", str(output)])
    assert tokenizers.SentencePieceTokenizer(output).vocab_size == 45
    assert os.listdir(tmp_path / "new_folder") == ["cli.model"]  # no partial file left beside it


def _caption_folder(tmp_path, captions):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    lines = []
    for index, caption in enumerate(captions):
        (image_dir / f"{index}.jpg").write_bytes(b"unused")
        lines.append(json.dumps({"image": f"{index}.jpg", "caption": caption}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    return image_dir, tmp_path / "captions.jsonl"


def test_a_missing_vocabulary_is_trained_on_first_use_into_new_folders_and_then_reused(tmp_path):
    from siglip_jax.config import default_config, source_config
    from siglip_jax.data.from_config import build_tokenizer

    image_dir, captions_file = _caption_folder(tmp_path, CAPTIONS[:40])
    config = default_config()
    config.data.train = source_config("caption_folder", image_dir=str(image_dir), captions_file=str(captions_file))
    config.data.tokenizer, config.data.lowercase, config.data.tokenizer_vocab_size = "sentencepiece", True, 45
    config.data.tokenizer_path = str(tmp_path / "cache" / "not" / "yet" / "made.model")  # the folders too
    tokenizer = build_tokenizer(config)
    assert tokenizer.vocab_size == 45 and sorted(os.listdir(tmp_path / "cache/not/yet")) == ["made.model"]
    ids = tokenizer(["A Dog runs on the beach ."])[0]
    pieces = _pieces_to_text(tokenizer.processor, [i for i in ids if i != tokenizer.eos_id])
    assert pieces == "a dog runs on the beach ."  # lowercased as data.lowercase says
    made = os.stat(config.data.tokenizer_path).st_mtime_ns
    build_tokenizer(config)  # the second run reads the cached file
    assert os.stat(config.data.tokenizer_path).st_mtime_ns == made
    if os.path.isdir("/sys/kernel"):  # sysfs refuses new files even to root: an unwritable cache folder
        config.data.tokenizer_path = "/sys/kernel/siglip_jax_cache/made.model"
        with pytest.raises(OSError, match=r"Cannot write the vocabulary to '/sys/kernel/siglip_jax_cache/made.model' "
                                          r".*--config.data.tokenizer_path"):
            build_tokenizer(config)
    config.data.tokenizer_vocab_size, config.data.tokenizer_path = 0, str(tmp_path / "absent.model")
    with pytest.raises(FileNotFoundError, match="absent.model"):  # 0: a missing file is the user's to fix
        build_tokenizer(config)


def test_train_tokenizer_explains_too_large_vocab(tmp_path):
    with pytest.raises(RuntimeError, match="lower vocab_size"):
        train_sentencepiece(CAPTIONS[:8], tmp_path / "x.model", vocab_size=5000)


# ---------------------------------------------------------------------------------- hf

@pytest.fixture(scope="module")
def word_level_json(tmp_path_factory):
    """A hand-written WordLevel vocabulary, so expected ids follow by dictionary lookup."""
    tokenizers_lib = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2, "a": 3, "dog": 4, "runs": 5, "on": 6, "the": 7,
             "beach": 8, ".": 9, "A": 10}
    model = tokenizers_lib.models.WordLevel(vocab, unk_token="<unk>")
    tokenizer = tokenizers_lib.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers_lib.pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<unk>", "</s>", "<pad>"])
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path), vocab


def test_hf_tokenizer_matches_dictionary_lookup(word_level_json):
    path, vocab = word_level_json
    tokenizer = tokenizers.make_tokenizer("hf", max_len=5, path=path)
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 1, len(vocab))
    ids = tokenizer(["A dog runs", "a dog runs on the beach .", "zebra"])

    def reference(text):
        words = [vocab.get(word, vocab["<unk>"]) for word in text.split()][:4]
        return words + [1] + [1] * (4 - len(words))

    np.testing.assert_array_equal(ids, [reference("A dog runs"),
                                        reference("a dog runs on the beach ."),
                                        reference("zebra")])
    assert tokenizer.decode(ids[0]) == "A dog runs"


def test_hf_tokenizer_options(word_level_json):
    path, _ = word_level_json
    tokenizer = tokenizers.HFTokenizer(path, max_len=4, lowercase=True, pad_token="<pad>")
    np.testing.assert_array_equal(tokenizer(["A DOG"]), [[3, 4, 1, 2]])
    with pytest.raises(ValueError, match="special tokens there"):
        tokenizers.HFTokenizer(path, eos_token="<|end|>")


# ---------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kind,path,error,match", [
    ("wordpiece", None, ValueError, "valid kinds"),
    ("sentencepiece", None, ValueError, "needs path"),
    ("sentencepiece", "/nonexistent/c4_en.model", FileNotFoundError, "not found"),
    ("hf", "/nonexistent/tokenizer.json", FileNotFoundError, "not found"),
    ("byte", "/some/file", ValueError, "needs no model file"),
])
def test_make_tokenizer_errors(kind, path, error, match):
    with pytest.raises(error, match=match):
        tokenizers.make_tokenizer(kind, max_len=16, path=path)
