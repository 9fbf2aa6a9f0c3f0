"""DeepSeek V4 tokenizer built from GGUF ``tokenizer.ggml.*`` metadata.

Byte-level BPE (GPT-2 byte map) run by HF ``tokenizers``. Two ways in:

* ``encode(text)``: plain BPE. Text from users, files and tools goes this way,
  so a file that contains ``<｜User｜>`` or ``｜DSML｜`` stays plain text and can
  never forge a control token.
* ``encode_trusted(text)`` / ``encode_pieces(pieces)``: for template text we
  wrote ourselves; added-token strings become their single ids.

Invalid UTF-8: input is Python ``str`` and always valid; callers that read
bytes decode them first (tools use ``errors="replace"``). Output tokens may
end inside a multi-byte character, so ``decode_bytes`` returns raw bytes,
``decode`` replaces invalid sequences with U+FFFD, and ``StreamDecoder``
holds back an incomplete trailing character until the next token arrives.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers

from .errors import TokenizerError

RUN_MEMO = 2048  # text runs kept: a long agent conversation has a few hundred

# llama.cpp token types as stored in ``tokenizer.ggml.token_type``.
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
CONTROL_STRINGS = (BOS, EOS, USER, ASSISTANT, THINK, THINK_END, DSML)

# The V4 pre-tokenizer: digits in runs of up to three, CJK runs, then the
# word/punctuation/space split; applied in sequence, then the byte map.
_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+",
)


@dataclass(frozen=True)
class Special:
    """A control token in rendered template output, by its exact string."""

    text: str


Piece = str | Special


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from raw bytes to printable code points."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_ASCII_ADDED = re.compile(r"</?think>|</?dsml:|<\|[^|]+\|>")
_BYTE_OF_CHAR = {c: b for b, c in byte_to_unicode().items()}


def _is_byte_level(token: str) -> bool:
    return all(c in _BYTE_OF_CHAR for c in token)


class Tokenizer:
    def __init__(self, tokens: Sequence[str], merges: Sequence[str],
                 token_types: Sequence[int] | None = None):
        if not tokens:
            raise TokenizerError("tokenizer has no tokens",
                                 "the GGUF needs a tokenizer.ggml.tokens array")
        self.tokens = list(tokens)
        if token_types is not None and len(token_types) != len(self.tokens):
            raise TokenizerError(
                f"tokenizer.ggml.token_type has {len(token_types)} entries "
                f"for {len(self.tokens)} tokens")
        self.added = self._added_ids(token_types)
        self._id_of = dict(zip(self.tokens, range(len(self.tokens))))
        vocab = dict(self._id_of)
        for i in self.added:
            if vocab.get(self.tokens[i]) == i:
                del vocab[self.tokens[i]]
        self._bpe = self._build_bpe(vocab, merges)
        self._bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated")
             for p in _SPLITS]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._bpe.decoder = decoders.ByteLevel()
        for name in CONTROL_STRINGS:
            if name not in self._id_of or self._id_of[name] not in self.added:
                raise TokenizerError(f"tokenizer lacks the control token {name!r}",
                                     "is this a DeepSeek V4 tokenizer?")
        self.bos_id = self._id_of[BOS]
        self.eos_id = self._id_of[EOS]

    @staticmethod
    def _build_bpe(vocab: dict[str, int], merges: Sequence[str]) -> HFTokenizer:
        """The BPE model. HF checks every merge names known tokens while it builds (its
        build is most of the ~0.3 s an open costs); our own walk only runs to name the
        first bad merge when it refuses."""
        try:
            return HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                          ignore_merges=False))
        except Exception as err:  # tokenizers raises a bare Exception (or TypeError) here
            for rank, merge in enumerate(merges):
                left, sep, right = merge.partition(" ")
                if not sep or left not in vocab or right not in vocab:
                    raise TokenizerError(f"tokenizer merge #{rank} {merge!r} is malformed "
                                         "or names an unknown token") from None
            raise TokenizerError(f"tokenizer merges rejected: {str(err).splitlines()[0]}") from None

    @cached_property
    def _added_re(self) -> re.Pattern:
        """Added-token strings, longest first (built on first use: only template text needs it)."""
        added_sorted = sorted((self.tokens[i] for i in self.added), key=len, reverse=True)
        return re.compile("|".join(re.escape(t) for t in added_sorted))

    def _added_ids(self, token_types: Sequence[int] | None) -> frozenset[int]:
        if token_types is not None:
            return frozenset(i for i, t in enumerate(token_types)
                             if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED))
        # Without types (ds4 reads only tokens and merges): a BPE token is
        # spelled in the byte-map alphabet; the few added tokens that are too
        # (<think>, <|EOT|>, <dsml:, the <|place_holder...|> family) by shape.
        return frozenset(i for i, t in enumerate(self.tokens)
                         if not _is_byte_level(t) or _ASCII_ADDED.fullmatch(t))

    @classmethod
    def from_metadata(cls, meta: dict) -> "Tokenizer":
        try:
            tokens = meta["tokenizer.ggml.tokens"]
            merges = meta["tokenizer.ggml.merges"]
        except KeyError as err:
            raise TokenizerError(f"GGUF metadata lacks {err.args[0]}",
                                 "rebuild the model file with its tokenizer") from None
        return cls(tokens, merges, meta.get("tokenizer.ggml.token_type"))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_id(self, text: str) -> int:
        """The id of a token given by its exact string (control tokens included)."""
        try:
            return self._id_of[text]
        except KeyError:
            raise TokenizerError(f"unknown token {text!r}") from None

    def encode(self, text: str) -> list[int]:
        """Plain BPE: no special-token recognition (for untrusted text)."""
        if not text:
            return []
        return self._bpe.encode(text, add_special_tokens=False).ids

    def encode_trusted(self, text: str) -> list[int]:
        """Template text: added-token strings become their single ids."""
        ids: list[int] = []
        pos = 0
        for m in self._added_re.finditer(text):
            ids += self.encode(text[pos:m.start()])
            ids.append(self._id_of[m.group()])
            pos = m.end()
        return ids + self.encode(text[pos:])

    def encode_pieces(self, pieces: Iterable[Piece]) -> list[int]:
        """Rendered chat: specials by id, adjacent text runs BPE'd as one string
        (so pre-tokenizer splits match tokenizing the whole prompt at once)."""
        ids: list[int] = []
        run: list[str] = []
        for piece in pieces:
            if isinstance(piece, Special):
                ids += self._encode_run("".join(run))
                run.clear()
                ids.append(self.token_id(piece.text))
            else:
                run.append(piece)
        ids += self._encode_run("".join(run))
        return ids

    @cached_property
    def _encode_run(self):
        """A text run between specials -> its ids, remembered: a conversation re-rendered each
        turn (the server counts every request, ``sync`` renders it again) re-encodes only its new
        runs. One memo per tokenizer."""
        return lru_cache(maxsize=RUN_MEMO)(lambda text: tuple(self.encode(text)))

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        out = []
        for i, tok in enumerate(self.tokens):
            if i in self.added or not _is_byte_level(tok):
                out.append(tok.encode("utf-8"))
            else:
                out.append(bytes(_BYTE_OF_CHAR[c] for c in tok))
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._token_bytes
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Token ids in, text out, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
