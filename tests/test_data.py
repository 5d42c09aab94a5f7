"""The data path on the real C4 shards and the real T5 tokenizer."""

import glob
import gzip
import itertools
import json

import datasets
import pytest
import torch
from conftest import EVAL_FILES, TOKENIZER, TRAIN_FILES

from galore_train.data import (
    BAD_LINES,
    IGNORE_INDEX,
    PretrainingStream,
    Tokenize,
    build_eval_batches,
    cached_eval_batches,
    document_source,
    eval_cache_key,
    load_tokenizer,
    read_c4_lines,
)
from galore_train.errors import UserError


@pytest.fixture(scope="module")
def tokenize(shared_data):
    return Tokenize(load_tokenizer(TOKENIZER), max_length=64, vocab_size=32000)


def train_stream(tokenize, files=TRAIN_FILES, **kwargs):
    options = dict(batch_size=4, pack=False, shuffle_buffer=32, seed=0)
    options.update(kwargs)
    return PretrainingStream(lambda: document_source(files, "--data-files", "", "", "train"), tokenize, **options)


def test_real_t5_tokenizer_ids(shared_data):
    for source in (TOKENIZER, TOKENIZER + "/spiece.model"):
        tokenizer = load_tokenizer(source)
        assert len(tokenizer) == 32100
        assert tokenizer("Hello world")["input_ids"] == [8774, 296, 1]


def test_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="holds no tokenizer files"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer("no-such-org/no-such-tokenizer")


def test_sentinel_ids_cannot_index_past_the_embedding(tokenize):
    before = tokenize.remapped_ids
    (ids,) = tokenize(["<extra_id_0> hello"], truncate=True)
    assert max(ids) < 32000 and ids[0] == tokenize.unk_id
    assert tokenize.remapped_ids == before + 1


def test_a_vocab_smaller_than_the_text_ids_is_refused(shared_data):
    with pytest.raises(UserError, match="embeds only 1000"):
        Tokenize(load_tokenizer(TOKENIZER), max_length=64, vocab_size=1000)


def test_paper_mode_batches_exclude_padding_from_labels(tokenize):
    batch = train_stream(tokenize).next_batch()
    assert batch["input_ids"].shape == (4, 64)
    padded = batch["attention_mask"] == 0
    assert (batch["labels"][padded] == IGNORE_INDEX).all()
    assert (batch["labels"][~padded] == batch["input_ids"][~padded]).all()
    assert batch["input_ids"].max() < 32000


def test_pack_mode_fills_every_position(tokenize):
    stream = train_stream(tokenize, pack=True)
    batches = [stream.next_batch() for _ in range(8)]
    assert all(batch["attention_mask"].all() for batch in batches)
    eos = sum(int((batch["input_ids"] == tokenize.eos_id).sum()) for batch in batches)
    assert eos >= 2  # documents are separated by EOS


def test_order_follows_the_seed(tokenize):
    a, b, c = (train_stream(tokenize, seed=s).next_batch()["input_ids"] for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("pack", [False, True])
def test_resumed_stream_continues_with_the_next_unseen_batch(tokenize, pack):
    stream = train_stream(tokenize, pack=pack)
    for _ in range(5):
        stream.next_batch()
    state = json.loads(json.dumps(stream.state_dict()))  # must survive JSON
    expected = [stream.next_batch()["input_ids"] for _ in range(4)]
    resumed = train_stream(tokenize, pack=pack)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next_batch()["input_ids"]) for x in expected)


def write_shard(path, lines):
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def test_real_world_variation_and_bad_lines_are_skipped_and_counted(tokenize, tmp_path):
    with gzip.open(EVAL_FILES.replace("*", "c4-train.00000-of-01024.docs0850-0949"), "rt") as f:
        real = [json.loads(line) for line in f][:6]
    lines = [
        json.dumps(real[0]),
        "{not json",
        json.dumps({"text": real[1]["text"], "date": "2019-04-21"}),
        json.dumps({"url": "x"}),
        json.dumps({"text": real[2]["text"]}),
    ]
    write_shard(tmp_path / "a.json.gz", lines)
    (tmp_path / "b.json").write_text(json.dumps(real[3]) + "\n")
    before = BAD_LINES.count
    source = document_source(str(tmp_path / "*.json*"), "--data-files", "", "", "train")
    texts = [record["text"] for record in source]
    assert texts == [real[0]["text"], real[1]["text"], real[2]["text"], real[3]["text"]]
    assert BAD_LINES.count == before + 2


def test_epochs_repeat_small_data(tokenize, tmp_path):
    (tmp_path / "small.json").write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(6)))
    stream = train_stream(tokenize, files=str(tmp_path / "small.json"), batch_size=4, shuffle_buffer=2)
    for _ in range(4):
        stream.next_batch()
    assert stream.epoch >= 2


def test_missing_data_is_a_user_error():
    with pytest.raises(UserError, match="matches no files"):
        document_source("/nonexistent/*.json.gz", "--data-files", "", "", "train")


def test_eval_tokens_are_fixed_and_counted(tokenize, shared_data):
    def build():
        return build_eval_batches(
            document_source(EVAL_FILES, "--eval-data-files", "", "", "validation"),
            tokenize,
            eval_tokens=3000,
            batch_size=8,
        )

    (first, scored), (second, _) = build(), build()
    assert 3000 <= scored < 3000 + 64
    labelled = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in first)
    assert labelled == scored
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))


# --- tokenizing only what is kept ----------------------------------------------------------------


@pytest.mark.parametrize("max_length", [16, 256, 1024])
def test_cut_text_gives_the_tokenizers_own_truncated_ids_on_every_real_document(shared_data, max_length):
    tokenizer = load_tokenizer(TOKENIZER)
    tokenize = Tokenize(tokenizer, max_length=max_length, vocab_size=32100)
    assert tokenize.cut_chars is not None  # the T5 pipeline is cut
    texts = [record["text"] for record in read_c4_lines(sorted(glob.glob(TRAIN_FILES) + glob.glob(EVAL_FILES)))]
    expected = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    assert tokenize(texts, truncate=True) == expected
    assert sum(len(text) > tokenize.cut_chars for text in texts) > 100  # the cut was exercised


def test_a_cut_that_leaves_too_few_whole_words_tokenizes_the_whole_text(shared_data):
    tokenizer = load_tokenizer(TOKENIZER)
    tokenize = Tokenize(tokenizer, max_length=16, vocab_size=32100)
    budget = tokenize.cut_chars
    texts = [
        "x" * (budget + 50) + " tail",  # one long word: the budget holds no whole word
        "a " * 14 + "b" * (budget - 30) + "ccc dd",  # the 15th token lies in the word the cut splits
        "Good morning " * 200,
    ]
    assert tokenize(texts, truncate=True) == tokenizer(texts, truncation=True, max_length=16)["input_ids"]


def test_other_special_token_layouts_match_the_tokenizers_own(shared_data):
    import copy

    from tokenizers.processors import TemplateProcessing

    texts = [record["text"] for record in read_c4_lines(sorted(glob.glob(EVAL_FILES)))]
    bos_and_eos = copy.deepcopy(load_tokenizer(TOKENIZER))
    bos_and_eos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<pad> $A </s>", special_tokens=[("<pad>", 0), ("</s>", 1)]
    )
    tokenize = Tokenize(bos_and_eos, max_length=64, vocab_size=32100)
    assert tokenize.specials == ([0], [1])
    expected = bos_and_eos(texts, truncation=True, max_length=64)["input_ids"]
    assert expected[0][0] == 0 and expected[0][-1] == 1 and len(expected[0]) == 64
    assert tokenize(texts, truncate=True) == expected
    tokenize.specials = None  # a post-processor other than a template: each sequence through the tokenizer's own
    assert tokenize(texts, truncate=True) == expected


def test_pack_mode_tokenizes_whole_documents_in_batches(tokenize):
    texts = ["first document", "a second, longer document " * 40]
    assert tokenize(texts, truncate=False) == tokenize.tokenizer(texts)["input_ids"]


# --- batches made ahead on a producer thread -----------------------------------------------------


def consumed(stream, count):
    return [stream.next_batch()["input_ids"] for _ in range(count)]


@pytest.mark.parametrize("pack", [False, True])
def test_prefetched_batches_and_positions_equal_the_inline_stream(tokenize, pack):
    inline, ahead = train_stream(tokenize, pack=pack), train_stream(tokenize, pack=pack, prefetch=3)
    with ahead:
        assert all(torch.equal(a, b) for a, b in zip(consumed(inline, 5), consumed(ahead, 5)))
        assert ahead.epoch == inline.epoch
        state = json.loads(json.dumps(ahead.state_dict()))
        assert state == json.loads(json.dumps(inline.state_dict()))  # the read-ahead is not in the position
        expected = consumed(ahead, 4)
    resumed = train_stream(tokenize, pack=pack, prefetch=3)
    resumed.load_state_dict(state)
    with resumed:
        assert all(torch.equal(x, y) for x, y in zip(expected, consumed(resumed, 4)))


def test_a_stopped_producer_resumes_from_the_consumed_position(tokenize):
    inline, ahead = train_stream(tokenize), train_stream(tokenize, prefetch=2)
    expected = consumed(inline, 6)
    with ahead:
        first = consumed(ahead, 3)
        ahead.close()
        assert all(torch.equal(x, y) for x, y in zip(expected, first + consumed(ahead, 3)))


def producer_threads():
    import threading

    return [thread for thread in threading.enumerate() if thread.name == "galore-train-data" and thread.is_alive()]


def test_a_producer_error_is_raised_in_the_consumer_and_stops_the_thread(tokenize, tmp_path):
    (tmp_path / "empty.json").write_text("\n")
    before = set(producer_threads())  # other tests' streams are not this test's business
    stream = train_stream(tokenize, files=str(tmp_path / "empty.json"), prefetch=2)
    with pytest.raises(UserError, match="holds no documents"):
        stream.next_batch()
    assert not set(producer_threads()) - before


def test_ctrl_c_while_waiting_for_a_batch_leaves_no_thread(tokenize, monkeypatch, request):
    import _thread
    import signal
    import threading
    import time

    from galore_train.data.stream import BatchStream

    produce = BatchStream.produce
    waiting = threading.Event()  # set by the consumer's own wait for a batch (a timer can fire too early)
    fired = []

    def slow_produce(self):
        if not fired and waiting.wait(timeout=10):
            fired.append(True)  # one Ctrl-C only, while the consumer waits for this batch
            _thread.interrupt_main()
        time.sleep(0.3)
        return produce(self)

    monkeypatch.setattr(BatchStream, "produce", slow_produce)
    # Ctrl-C raises KeyboardInterrupt, even where this process inherited SIGINT ignored (a shell's `cmd &`).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    before = set(producer_threads())
    stream = train_stream(tokenize, prefetch=2)
    queue_get = stream._queue.get

    def consumer_waits(*args, **kwargs):
        waiting.set()
        return queue_get(*args, **kwargs)

    stream._queue.get = consumer_waits
    with pytest.raises(KeyboardInterrupt):
        with stream:
            stream.next_batch()
    assert fired, "the Ctrl-C came while the consumer waited in next_batch"
    assert not set(producer_threads()) - before


def test_close_gives_up_on_a_stalled_producer(tokenize, monkeypatch, caplog):
    import threading

    from galore_train.data import prefetch
    from galore_train.data.stream import BatchStream

    release = threading.Event()
    produce = BatchStream.produce

    def stalled_after_one(self):
        if getattr(self, "made", 0):
            release.wait()
        self.made = 1
        return produce(self)

    monkeypatch.setattr(BatchStream, "produce", stalled_after_one)
    monkeypatch.setattr(prefetch, "CLOSE_SECONDS", 0.3)
    stream = train_stream(tokenize, prefetch=2)
    stream.next_batch()
    stream.close()
    assert "did not stop" in caplog.text
    with pytest.raises(RuntimeError, match="still held"):
        stream.next_batch()
    release.set()


def test_a_stalled_producer_shows_as_waiting_time_then_resets(tokenize, monkeypatch):
    """Each batch takes the producer at least STALL seconds, so the consumer waits at least that long for its
    first batch (the thread starts with it): a lower bound no busy machine can undercut."""
    import time

    from galore_train.data.stream import BatchStream

    stall, produce = 0.3, BatchStream.produce
    monkeypatch.setattr(BatchStream, "produce", lambda self: time.sleep(stall) or produce(self))
    with train_stream(tokenize, prefetch=2) as stream:
        consumed(stream, 2)
        assert stream.take_wait_seconds() >= stall
        assert stream.take_wait_seconds() == 0


def test_batches_are_pinned_only_for_cuda(tokenize, monkeypatch):
    from galore_train.data import pin_batches

    assert not pin_batches(torch.device("cpu")) and not pin_batches(torch.device("cuda"))  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pin_batches(torch.device("cuda")) and not pin_batches(torch.device("cpu"))
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor) or tensor)
    with train_stream(tokenize, prefetch=2, pin_memory=True) as stream:
        batch = stream.next_batch()
    assert any(tensor is batch["input_ids"] for tensor in pinned) and len(pinned) >= 3


# --- the validation token cache ------------------------------------------------------------------


def eval_source():
    return document_source(EVAL_FILES, "--eval-data-files", "", "", "validation")


def cached(tokenize, cache_dir, eval_tokens=3000, **kwargs):
    key = eval_cache_key(EVAL_FILES, "hub", tokenize, eval_tokens)
    return cached_eval_batches(cache_dir, key, eval_source, tokenize, batch_size=8, **kwargs)


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_eval_cache_is_built_once_and_equals_a_fresh_build(tokenize, tmp_path, monkeypatch):
    fresh, scored = build_eval_batches(eval_source(), tokenize, eval_tokens=3000, batch_size=8)
    built, built_scored = cached(tokenize, tmp_path)
    assert same_batches(built, fresh) and built_scored == scored
    assert len(list(tmp_path.glob("eval-*.pt"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as patch:
        patch.setattr(Tokenize, "encode", no_tokenizing)
        batches, cached_scored = cached(tokenize, tmp_path, builder=False)  # another process reads it
    assert same_batches(batches, fresh) and cached_scored == scored
    cached(tokenize, tmp_path, eval_tokens=2000)  # other settings: another cache entry
    assert len(list(tmp_path.glob("eval-*.pt"))) == 2


def test_a_damaged_eval_cache_is_rebuilt(tokenize, tmp_path, caplog):
    fresh, scored = cached(tokenize, tmp_path)
    (file,) = tmp_path.glob("eval-*.pt")
    file.write_bytes(file.read_bytes()[:100])
    batches, rebuilt_scored = cached(tokenize, tmp_path)
    assert same_batches(batches, fresh) and rebuilt_scored == scored
    assert "ignoring the validation token cache" in caplog.text


def test_an_eval_build_error_stops_every_process(tokenize, tmp_path):
    (tmp_path / "empty.json").write_text("\n")
    key = eval_cache_key(str(tmp_path / "empty.json"), "hub", tokenize, 100)
    source = lambda: document_source(str(tmp_path / "empty.json"), "--eval-data-files", "", "", "validation")  # noqa: E731
    with pytest.raises(UserError, match="holds no documents"):
        cached_eval_batches(tmp_path, key, source, tokenize, batch_size=8)
    with pytest.raises(UserError, match="first process could not build"):  # a reader, told by the collective
        cached_eval_batches(tmp_path, key, source, tokenize, batch_size=8, builder=False, agree=lambda failed: True)


# --- data prepared ahead (galore-train prepare-data) ---------------------------------------------


@pytest.fixture(scope="module")
def prepared_dir(shared_data, tmp_path_factory):
    from galore_train.data.prepared import prepare_data

    output = tmp_path_factory.mktemp("prepared")
    manifest, kept = prepare_data(TRAIN_FILES, TOKENIZER, output, num_proc=2)
    assert kept == 0
    assert manifest["documents"] == sum(1 for _ in read_c4_lines(sorted(glob.glob(TRAIN_FILES))))
    return output


def prepared_stream(tokenize, directory, **kwargs):
    options = dict(batch_size=4, pack=False, shuffle_buffer=32, seed=0)
    options.update(kwargs)
    return PretrainingStream(
        lambda: document_source(str(directory), "--data-files", "", "", "train", tokenize), tokenize, **options
    )


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize(("rank", "world_size"), [(0, 2), (1, 2), (2, 3)])  # whole shards; every third document
def test_prepared_data_gives_the_streamed_batches_and_resumes(tokenize, prepared_dir, pack, rank, world_size):
    split = dict(pack=pack, rank=rank, world_size=world_size, shuffle_buffer=8, batch_size=32)
    streamed, prepared = train_stream(tokenize, **split), prepared_stream(tokenize, prepared_dir, prefetch=2, **split)
    count = 250 if pack else 40  # into the second epoch of this rank's share
    with prepared:
        for _ in range(count):
            a, b = streamed.next_batch(), prepared.next_batch()
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        assert prepared.epoch == streamed.epoch >= 1
        state = json.loads(json.dumps(prepared.state_dict()))
        if not pack:  # both read the same documents per batch: the same position, in the same format
            assert {**state, "buffer": None} == {**streamed.state_dict(), "buffer": None}
        expected = consumed(prepared, 3)
    resumed = prepared_stream(tokenize, prepared_dir, **split)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, consumed(resumed, 3)))


# an empty shard; more than 10 shards (read in groups)
@pytest.mark.parametrize("counts", [[3, 2, 4], [5, 0, 3, 1], [4, 4], [1], [2, 7, 1, 0, 3, 4, 2, 2, 5, 1, 3, 6, 2]])
def test_prepared_order_and_position_are_those_of_datasets(counts):
    """ShardOrder against `datasets` itself, as BatchStream uses it: every document, every state, and resuming
    from every state, for each rank of 1-3 and three epochs (the generator yields global document indices)."""
    from datasets.distributed import split_dataset_by_node

    from galore_train.data.shard_order import ShardOrder

    def documents(shards):
        for first, count in shards:
            yield from ({"i": first + j} for j in range(count))

    def source(epoch, rank, world_size, state=None):
        shards = list(zip(itertools.accumulate([0, *counts[:-1]]), counts))
        dataset = datasets.IterableDataset.from_generator(documents, gen_kwargs={"shards": shards})
        dataset = dataset.shuffle(seed=7, buffer_size=1)
        dataset.set_epoch(epoch)
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        if state is not None:
            dataset.load_state_dict(state)
        return dataset

    for world_size, epoch in itertools.product((1, 2, 3), (0, 1, 2)):
        for rank in range(world_size):
            theirs, ours = source(epoch, rank, world_size), ShardOrder(counts, 7, epoch, rank, world_size)
            states, their_documents, our_documents = [], iter(theirs), iter(ours)
            while True:  # to the state after the end
                record = next(their_documents, None)
                assert (record and record["i"]) == next(our_documents, None)
                assert ours.state_dict() == theirs.state_dict()
                if record is None:
                    break
                states.append(theirs.state_dict())
            for state in states:
                expected = [record["i"] for record in source(epoch, rank, world_size, state)]
                assert list(ShardOrder(counts, 7, epoch, rank, world_size, state)) == expected
    with pytest.raises(UserError, match="saved data position does not fit this data"):
        ShardOrder(counts, 7, 0, 0, 1, {"examples_iterable": {"previous_states": []}, "epoch": 0})


def test_the_prepared_reader_keeps_few_shards_open(tokenize, prepared_dir, monkeypatch):
    import galore_train.data.prepared

    monkeypatch.setattr(galore_train.data.prepared, "MAX_OPEN", 1)  # every map holds a file descriptor
    streamed, prepared = train_stream(tokenize, batch_size=32), prepared_stream(tokenize, prepared_dir, batch_size=32)
    assert all(torch.equal(a, b) for a, b in zip(consumed(streamed, 60), consumed(prepared, 60)))  # both shards
    assert len(prepared.stream.prepared._open) == 1


@pytest.mark.parametrize("pack", [False, True])
def test_prepared_ids_the_model_cannot_embed_become_unk_and_are_counted(tokenize, tmp_path, pack):
    from galore_train.data.prepared import prepare_data

    write_shard(tmp_path / "a.json.gz", [json.dumps({"text": f"<extra_id_{i}> word {i} " * 9}) for i in range(30)])
    files = str(tmp_path / "*.json.gz")
    prepare_data(files, TOKENIZER, tmp_path / "prepared")
    start = tokenize.remapped_ids
    streamed = [train_stream(tokenize, files=files, pack=pack).next_batch() for _ in range(3)]
    counted = tokenize.remapped_ids - start
    prepared = [prepared_stream(tokenize, tmp_path / "prepared", pack=pack).next_batch() for _ in range(3)]
    assert all(torch.equal(a[key], b[key]) for a, b in zip(streamed, prepared) for key in a)
    assert tokenize.remapped_ids - start == 2 * counted > 0


@pytest.mark.parametrize("pack", [False, True])
def test_a_run_can_switch_from_its_shards_to_their_prepared_directory(tokenize, prepared_dir, pack):
    streamed = train_stream(tokenize, pack=pack, shuffle_buffer=8, batch_size=8)
    consumed(streamed, 3)
    state = json.loads(json.dumps(streamed.state_dict()))
    switched = prepared_stream(tokenize, prepared_dir, pack=pack, shuffle_buffer=8, batch_size=8)
    switched.load_state_dict(state)  # its buffer holds texts, its source yields ids
    assert all(torch.equal(a, b) for a, b in zip(consumed(streamed, 6), consumed(switched, 6)))


def test_prepared_data_refuses_another_tokenizer_and_damaged_files(tokenize, prepared_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared_dir, copy)
    other = Tokenize(load_tokenizer(TOKENIZER), max_length=64, vocab_size=32000)
    other.fingerprint = "0" * 64
    with pytest.raises(UserError, match=r"manifest.json was prepared with tokenizer .*not this run's --tokenizer"):
        document_source(str(copy), "--data-files", "", "", "train", other)
    with pytest.raises(UserError, match="only --data-files reads those"):
        document_source(str(copy), "--eval-data-files", "", "", "validation")
    tokens = copy / "00001.tokens"
    tokens.write_bytes(tokens.read_bytes()[:-10])
    with pytest.raises(UserError, match=f"{tokens} holds .* tokens, its manifest says"):
        document_source(str(copy), "--data-files", "", "", "train", tokenize)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["documents"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="00000.offsets.npy does not match its manifest"):
        document_source(str(copy), "--data-files", "", "", "train", tokenize)
    (copy / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="cannot read prepared data manifest"):
        document_source(str(copy), "--data-files", "", "", "train", tokenize)


def test_an_interrupted_prepare_data_keeps_its_finished_shards(prepared_dir, tmp_path, monkeypatch):
    """A rerun tokenizes only the shards without a matching done record (missing, half-written, source changed)
    and writes the same files as one uninterrupted run."""
    import shutil

    from galore_train.data import prepared

    copy = tmp_path / "copy"
    shutil.copytree(prepared_dir, copy)
    (copy / "manifest.json").unlink()  # interrupted: no manifest yet
    (copy / "00001.done.json").unlink()  # shard 1 never finished: its token file is half-written
    (copy / "00001.tokens").write_bytes((prepared_dir / "00001.tokens").read_bytes()[:100])
    tokenized = []
    real = prepared._prepare_file
    monkeypatch.setattr(prepared, "_prepare_file", lambda index, *rest: tokenized.append(index) or real(index, *rest))
    monkeypatch.setattr(prepared, "ProcessPoolExecutor", lambda max_workers: _InProcessPool())
    manifest, kept = prepared.prepare_data(TRAIN_FILES, TOKENIZER, copy)
    shards = len(manifest["shards"])
    assert tokenized == [1] and kept == shards - 1
    for name in sorted(p.name for p in prepared_dir.iterdir()):
        assert (copy / name).read_bytes() == (prepared_dir / name).read_bytes(), name
    done = json.loads((copy / "00000.done.json").read_text())
    done["identity"]["mtime_ns"] += 1  # the source changed since: shard 0 is tokenized again
    (copy / "00000.done.json").write_text(json.dumps(done))
    tokenized.clear()
    assert prepared.prepare_data(TRAIN_FILES, TOKENIZER, copy)[1] == shards - 1 and tokenized == [0]


class _InProcessPool:
    """ProcessPoolExecutor's map in this process (so the test can see which shards are tokenized)."""

    def __enter__(self) -> "_InProcessPool":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn, *iterables):
        return map(fn, *iterables)


def test_an_unreachable_hub_names_the_flag_for_local_files(monkeypatch) -> None:
    """Offline, the validation split fails in one line that names --eval-data-files, not --data-files."""
    import datasets

    from galore_train.data.documents import document_source

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"\(validation\) from the hub: .*use --eval-data-files with local shards"):
        document_source(None, "--eval-data-files", "allenai/c4", "en", "validation")
