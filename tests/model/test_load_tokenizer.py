"""load_tokenizer: EOS becomes the pad token of a tokenizer that has none, and says so."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megakto.model.load import load_tokenizer, padding_note


def _save(path, **specials):
    vocab = {"<eos>": 0, "<unk>": 1, "<pad>": 2, "hello": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                            **specials).save_pretrained(str(path))
    return str(path)


def test_no_pad_token_pads_with_eos_and_says_so(tmp_path):
    path = _save(tmp_path / "tok")
    tok = load_tokenizer(path, key="model.path", trust_remote_code=False)
    assert (tok.pad_token, tok.pad_token_id) == ("<eos>", 0)
    assert padding_note(tok) == (
        f"tokenizer {type(tok).__name__}({path}) has no pad token: padding uses its EOS token "
        f"'<eos>' (id 0), masked out of every loss and log-prob")


def test_own_pad_token_is_kept_silently(tmp_path):
    tok = load_tokenizer(_save(tmp_path / "tok", pad_token="<pad>"), key="model.path",
                         trust_remote_code=False)
    assert (tok.pad_token_id, padding_note(tok)) == (2, None)
