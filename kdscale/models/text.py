"""Report (text) encoder: a BERT from ``transformers`` with its tokenizer inside the module.

Three ways to get the tokenizer and the BERT, never touching the network:

* ``pretrained`` (or its older spelling ``pretrained_path``) = a local Hugging Face folder (config
  + weights + tokenizer, as written by ``save_pretrained``), or a hub name read from the local
  Hugging Face cache (kdscale.models.weights.resolve_pretrained, docs/pretrained.md): ``AutoModel.from_pretrained`` and ``AutoTokenizer.from_pretrained`` with
  ``local_files_only=True``; ``tokenizer_path``, when also set, overrides the tokenizer.
* ``tokenizer_path`` only: that local tokenizer, and a randomly initialised BERT (``BertConfig``
  from the config's sizes) whose vocabulary is the tokenizer's.
* neither: a randomly initialised BERT, and :meth:`TextEncoder.fit` trains a WordPiece tokenizer
  (BERT normalizer and pre-tokenizer, special tokens [PAD] [UNK] [CLS] [SEP] [MASK]) on the
  training split's reports, then resizes the word embeddings to the learned vocabulary. Privacy:
  only words found in the reports of at least ``vocab_min_patients`` distinct patients (default
  5; the ids come from ``batch["meta"]``) are learned from, since the vocabulary is saved in the
  checkpoint (docs/guarantees.md).

Tokenization happens in ``forward`` (``batch["report"]`` is a list of strings) and the ids are
put on the module's device. The tokenizer (``tokenizers`` JSON, a plain str) is the module's
extra state: ``state_dict()`` carries it, and loading a state dict into a freshly built,
unfitted model restores it (and the embedding size) so the model works without ``fit()``.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from kdscale.models.unimodal import _device, batch_entry
from kdscale.models.weights import resolve_pretrained

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_STATE_VERSION = 1


def train_wordpiece_tokenizer(texts: Iterable, vocab_size: int = 4000, lowercase: bool = True,
                              min_frequency: int = 2, min_patients: int = 1):
    """A BERT-style WordPiece ``tokenizers.Tokenizer`` whose vocabulary is learned from ``texts``
    (streamed), the same on every run.

    [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; single texts become ``[CLS] ... [SEP]``.

    The vocabulary, in this order: the special tokens; every character of the learned words, as a
    word start and as a continuation (``##c``), so that any word made of seen characters is
    tokenized (unseen words become pieces, never [UNK]); then whole words seen at least
    ``min_frequency`` times, most frequent first (ties by the word), up to ``vocab_size``. Not
    ``tokenizers.trainers.WordPieceTrainer``: its vocabulary differs from run to run on the same
    texts (continuation tokens get ids in hash-map order, which breaks ties between merges;
    huggingface/tokenizers#1794, measured here: 5 of 6 trainings on the same 500 texts gave
    another vocabulary), and a report teacher must be reproducible from its seed.

    ``min_patients`` > 1 (privacy): ``texts`` are ``(patient_id, text)`` pairs, and only the words
    (after normalization and BERT pre-tokenization) found in the texts of at least that many
    distinct patients are learned from, so every token of the vocabulary -- which travels inside
    checkpoints -- is a word, or a character, that several patients' reports share. A name that
    occurs in one or two patients' reports, however often, never becomes a token (it is split into
    characters learned from common words, or [UNK])."""
    # tokenizers / transformers: ~2.7 s import (measured), only for report models
    from tokenizers import Tokenizer, decoders, models, processors

    splitter = _word_splitter(lowercase)
    if min_patients > 1:
        counts = _shared_word_counts(splitter, texts, min_patients)
    else:
        counts = Counter(w for text in texts for w in _words(splitter, text))
    vocab = {token: i for i, token in enumerate(_wordpiece_vocabulary(counts, vocab_size, min_frequency))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece(prefix="##")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if [ids[t] for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens got unexpected ids {ids}")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    return tok


def _wordpiece_vocabulary(word_counts: Counter, vocab_size: int, min_frequency: int) -> list[str]:
    """Specials, then each character as a start and a ``##`` continuation (sorted), then whole
    words by count (ties by the word): deterministic in ``word_counts`` alone."""
    chars = sorted({c for word in word_counts for c in word})
    tokens = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    taken = set(tokens)
    words = sorted((w for w, n in word_counts.items() if n >= min_frequency and w not in taken),
                   key=lambda w: (-word_counts[w], w))
    return tokens + words[:max(0, vocab_size - len(tokens))]


def _word_splitter(lowercase: bool):
    """(normalizer, pre-tokenizer) of the BERT tokenizer: text -> the words WordPiece learns from."""
    # tokenizers / transformers: ~2.7 s import (measured), only for report models
    from tokenizers import normalizers, pre_tokenizers

    return (normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                       lowercase=lowercase), pre_tokenizers.BertPreTokenizer())


def _words(splitter, text: str) -> list[str]:
    normalizer, pre_tokenizer = splitter
    return [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def _shared_word_counts(splitter, pairs: Iterable, min_patients: int) -> Counter:
    """``(patient_id, text)`` pairs -> the counts of the words found in the texts of at least
    ``min_patients`` distinct patients (other words are left out). One pass over the texts; per
    word at most ``min_patients`` ids are kept."""
    counts: Counter = Counter()
    patients: dict[str, set] = {}
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"min_patients={min_patients} needs (patient_id, text) pairs, got {type(item).__name__}")
        patient, text = item
        if patient is None or str(patient) == "":
            raise ValueError("a report without a patient id: the vocabulary's distinct-patient count "
                             "(vocab_min_patients) needs every report's patient")
        words = _words(splitter, text)
        counts.update(words)
        for word in set(words):
            seen = patients.setdefault(word, set())
            if len(seen) < min_patients:
                seen.add(str(patient))
    kept = sorted(w for w in counts if len(patients[w]) >= min_patients)
    if not kept:
        log.warning("tokenizer privacy filter: no word occurs in the reports of %d distinct patients (%d words "
                    "seen): the vocabulary holds the special tokens only and every report becomes [UNK]; lower "
                    "vocab_min_patients only if the data allows it", min_patients, len(counts))
    log.info("tokenizer privacy filter: %d of %d distinct words occur in the reports of >= %d patients; only "
             "those are learned from", len(kept), len(counts), min_patients)
    return Counter({word: counts[word] for word in kept})


def _local_dir(path: str, field: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{field} {path!r} is not a local directory (a Hugging Face folder written by "
                                f"save_pretrained; models are never downloaded)")
    return p


def load_hf_tokenizer(path: str, field: str = "tokenizer_path"):
    """A local HF tokenizer folder -> (own ``tokenizers.Tokenizer`` copy, pad token, pad id)."""
    # tokenizers / transformers: ~2.7 s import (measured), only for report models
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(_local_dir(path, field)), local_files_only=True)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{field} {path!r}: tokenizer {type(hf).__name__} has no fast (tokenizers) backend; "
                         f"save a fast tokenizer (tokenizer.json)")
    pad_token = hf.pad_token or "[PAD]"
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else backend.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"{field} {path!r}: the tokenizer has no padding token")
    return Tokenizer.from_str(backend.to_str()), pad_token, int(pad_id)


def _load_hf_model(auto_cls, directory: Path):
    """``from_pretrained`` of a local folder, never the network. Missing and unexpected keys are
    logged (e.g. a pooler absent from the checkpoint); a shape mismatch raises (transformers
    refuses it unless told to ignore it, and kdscale never does)."""
    model, info = auto_cls.from_pretrained(str(directory), local_files_only=True, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            log.warning("pretrained %s: %d %s: %s%s", directory, len(keys), kind.replace("_", " "),
                        ", ".join(keys[:8]), " ..." if len(keys) > 8 else "")
    return model


class TextEncoder(nn.Module):
    """``batch["report"]`` list[str] -> BERT pooled [CLS] features [B, hidden_size]."""

    def __init__(self, cfg):
        super().__init__()
        # tokenizers / transformers: ~2.7 s import (measured), only for report models
        from transformers import AutoModel, BertConfig, BertModel

        self.max_length = int(cfg.max_length)
        self.source = "untrained"       # untrained | trained | pretrained
        self._tokenizer = None
        self._pad_token, self._pad_id = "[PAD]", 0
        self._cfg = cfg
        tokenizer = None
        if cfg.tokenizer_path:
            tokenizer = load_hf_tokenizer(cfg.tokenizer_path, "tokenizer_path")
        weights = getattr(cfg, "weights", "") or cfg.pretrained_path
        if weights:
            directory = resolve_pretrained(weights, "transformers")   # local folder or cached hub name
            self.bert = _load_hf_model(AutoModel, directory)
            if tokenizer is None:
                tokenizer = load_hf_tokenizer(str(directory), "pretrained")
            limit = getattr(self.bert.config, "max_position_embeddings", None)
            if limit and self.max_length > limit:
                log.info("report max_length %d > the model's %d positions: using %d", self.max_length, limit, limit)
                self.max_length = int(limit)
        else:
            vocab = tokenizer[0].get_vocab_size(with_added_tokens=True) if tokenizer else cfg.vocab_size
            pad_id = tokenizer[2] if tokenizer else 0
            self.bert = BertModel(BertConfig(
                vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_length, pad_token_id=pad_id), add_pooling_layer=True)
        if tokenizer is not None:
            self._set_tokenizer(*tokenizer)
            self.source = "pretrained"
        self.feature_dim = int(self.bert.config.hidden_size)

    # --- tokenizer ---------------------------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        return self._tokenizer is None

    @property
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` (None until fitted/loaded)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.bert.get_input_embeddings().num_embeddings)

    def _set_tokenizer(self, tokenizer, pad_token: str, pad_id: int) -> None:
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_length)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, direction="right")
        self._tokenizer, self._pad_token, self._pad_id = tokenizer, pad_token, pad_id
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        if n > self.vocab_size:
            log.warning("tokenizer has %d tokens but the model only %d embeddings: resizing the embeddings",
                        n, self.vocab_size)
            self._resize(n)

    def _resize(self, rows: int) -> None:
        if rows != self.vocab_size:
            self.bert.resize_token_embeddings(rows, mean_resizing=False)

    def fit(self, batches: Iterable[dict]) -> None:
        """Train the WordPiece tokenizer on the training reports (None reports are skipped) and
        resize the word embeddings to its vocabulary."""
        if not self.needs_fit:
            return
        seen = [0]
        min_patients = int(getattr(self._cfg, "vocab_min_patients", 1))

        def reports() -> Iterator:
            for batch in batches:
                texts = batch_entry(batch, "report", "report")
                metas = batch.get("meta")
                for i, text in enumerate(texts):
                    if text is None:
                        continue
                    seen[0] += 1
                    if min_patients == 1:
                        yield text
                        continue
                    patient = metas[i].get("patient_id") if metas is not None and i < len(metas) else None
                    if patient is None:
                        raise ValueError(f"vocab_min_patients={min_patients}: the training batches carry no patient "
                                         f"id (batch['meta'][i]['patient_id']) to count distinct patients; set "
                                         f"vocab_min_patients: 1 only for data without patients")
                    yield patient, text

        tok = train_wordpiece_tokenizer(reports(), vocab_size=self._cfg.vocab_size, lowercase=self._cfg.lowercase,
                                        min_patients=min_patients)
        if seen[0] == 0:
            raise ValueError("fit(): the training batches hold no report to train the tokenizer on")
        self._set_tokenizer(tok, "[PAD]", 0)
        self._resize(tok.get_vocab_size(with_added_tokens=True))
        self.source = "trained"
        log.info("trained a WordPiece tokenizer on %d training reports: %d tokens (vocab_size limit %d, words of "
                 ">= %d distinct patients)", seen[0], self.vocab_size, self._cfg.vocab_size, min_patients)

    def tokenize(self, reports: list) -> dict[str, torch.Tensor]:
        """Reports -> ``input_ids`` / ``attention_mask`` [B, L] on the module's device."""
        if self._tokenizer is None:
            raise RuntimeError("the report model has no tokenizer yet: call fit() on the training batches, "
                               "or load a state dict saved after fit()")
        if isinstance(reports, str):
            raise ValueError("batch['report'] must be a list of strings, got one string")
        for i, text in enumerate(reports):
            if text is None:
                raise ValueError(f"batch['report'][{i}] is None: pass only samples that have a report "
                                 f"(batch['present']['report'])")
            if not isinstance(text, str):
                raise ValueError(f"batch['report'][{i}] is a {type(text).__name__}, not a str")
        encodings = self._tokenizer.encode_batch(list(reports))
        device = _device(self)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def forward(self, batch: dict) -> torch.Tensor:
        reports = batch_entry(batch, "report", "report")
        if len(reports) == 0:
            raise ValueError("batch['report'] is empty")
        out = self.bert(**self.tokenize(reports))
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    # --- checkpoint state --------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"version": _STATE_VERSION, "source": self.source, "max_length": self.max_length,
                "vocab_rows": self.vocab_size, "pad_token": self._pad_token, "pad_id": self._pad_id,
                "tokenizer": None if self._tokenizer is None else self._tokenizer.to_str()}

    def set_extra_state(self, state: Optional[dict]) -> None:
        # Runs before the BERT's own tensors are loaded (torch loads a module's extra state, then
        # its children), so resizing the embeddings here lets them load with the saved shape.
        if not state:
            return
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"report model extra state: unsupported format (version "
                             f"{state.get('version') if isinstance(state, dict) else type(state).__name__})")
        self._resize(int(state["vocab_rows"]))
        if state.get("tokenizer") is None:
            return
        # tokenizers / transformers: ~2.7 s import (measured), only for report models
        from tokenizers import Tokenizer

        self.max_length = int(state["max_length"])
        self._set_tokenizer(Tokenizer.from_str(state["tokenizer"]), state["pad_token"], int(state["pad_id"]))
        self.source = state.get("source", "trained")

    def summary(self) -> str:
        tok = "no tokenizer yet" if self._tokenizer is None else \
            f"{self.source} tokenizer of {self._tokenizer.get_vocab_size(with_added_tokens=True)} tokens"
        return f"vocab {self.vocab_size} ({tok}), max_length {self.max_length}"
