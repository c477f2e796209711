"""RecordIO labels read in bulk: the same labels as the record-by-record parse (multi-part records,
offsets at any byte), the same named errors on crafted files, and the benchmark's generated files."""
import re
import struct

import numpy as np
import pytest

from gif_kernels.train.data import RECORDIO_MAGIC, write_recordio
from gif_kernels.train.data.recordio import _RecordIO, read_recordio

from tests.helpers.bench_scripts import bench_script

MAGIC = struct.pack("<I", RECORDIO_MAGIC)
MAGIC_LABEL = int(struct.unpack("<f", MAGIC)[0])  # an integral float32 whose bits are the magic number


def write_files(tmp_path, payloads, labels, header_record=True):
    """train.rec and train.idx of these (bytes) payloads; their paths and the offsets of the .idx."""
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    write_recordio(rec, idx, payloads, labels, header_record=header_record)
    return rec, idx, [int(line.split("\t")[1]) for line in idx.read_text().splitlines()]


def write_offsets(idx, offsets):
    idx.write_text("".join(f"{key}\t{offset}\n" for key, offset in enumerate(offsets)))


def patch(rec, at, new: bytes):
    data = rec.read_bytes()
    rec.write_bytes(data[:at] + new + data[at + len(new):])


def labels_and_header_calls(monkeypatch, records):
    """records.labels(), and the records it read one by one through _header."""
    calls, header = [], _RecordIO._header
    monkeypatch.setattr(_RecordIO, "_header", lambda self, index: calls.append(index) or header(self, index))
    return records.labels(), calls


@pytest.mark.parametrize("header_record", [True, False])
@pytest.mark.parametrize("shift", [0, 2])  # records at offsets that are not multiples of 4
def test_bulk_labels_equal_the_record_by_record_parse(tmp_path, monkeypatch, header_record, shift):
    payloads = [b"jpeg" * 9,
                MAGIC + b"cut after the IR header",  # first part: the 24 bytes of the IR header alone
                b"png",  # padded to 4 bytes
                b"jpeg" + MAGIC + b"cut in the image",  # the header is whole in the first part
                b"jpeg",  # its label is MAGIC_LABEL: the first part is the 4 bytes of the flag
                b"",  # the last record, of 32 bytes: its header ends the file
                ]
    labels = [42, 7, 0, 1000, MAGIC_LABEL, 7]
    rec, idx, offsets = write_files(tmp_path, payloads, labels, header_record)
    rec.write_bytes(b"\xff" * shift + rec.read_bytes())
    write_offsets(idx, [offset + shift for offset in offsets])
    records, identity, names = read_recordio(str(tmp_path), 16)
    assert names == ["-1804698880", "0", "7", "42", "1000"] and identity.tolist() == [3, 2, 1, 4, 0, 2]
    bulk, one_by_one = labels_and_header_calls(monkeypatch, records)
    assert bulk.dtype == np.int64 and bulk.tolist() == labels
    assert one_by_one == [1, 4]  # the records whose header the magic number cuts
    assert [records._header(index)[1] for index in range(len(records))] == labels


def test_labels_of_flagged_records_are_their_first_extra_label(tmp_path, monkeypatch):
    rec, _, offsets = write_files(tmp_path, [b"jpeg", struct.pack("<f", 5), b"jpeg"], [1, 2, 3])
    patch(rec, offsets[2] + 8, struct.pack("<I", 1))  # record 2: flag 1, so its label is the image's bytes
    records, _, _ = read_recordio(str(tmp_path), 16)
    bulk, one_by_one = labels_and_header_calls(monkeypatch, records)
    assert bulk.tolist() == [1, 5, 3] and one_by_one == []


def corrupt(tmp_path, change):
    """The message read_recordio raises once `change(rec, idx, offsets)` damages a file of 9 records
    (1..9, after the header record 0)."""
    rec, idx, offsets = write_files(tmp_path, [b"jpeg" * 4] * 9, list(range(9)))
    change(rec, idx, offsets)
    with pytest.raises(ValueError) as error:
        read_recordio(str(tmp_path), 16)
    return str(error.value)


def test_crafted_files_raise_naming_the_record(tmp_path):
    rec = tmp_path / "train.rec"
    named = f"data: corrupt RecordIO record {{}} in {re.escape(str(rec))}: "
    cases = {  # record: (what goes wrong, how)
        4: ("no magic number at byte 184", lambda rec, idx, offsets: patch(rec, offsets[4], bytes(4))),
        3: ("part flag 2 out of sequence at byte 136",
            lambda rec, idx, offsets: patch(rec, offsets[3] + 4, struct.pack("<I", 2 << 29 | 40))),
        6: ("shorter than its header",  # flag 1 needs 28 bytes of payload up to the extra label
            lambda rec, idx, offsets: patch(rec, offsets[6] + 4, struct.pack("<II", 24, 1))),
        9: ("truncated at byte 464",  # the payload runs past the end
            lambda rec, idx, offsets: rec.write_bytes(rec.read_bytes()[:-8])),
        8: ("truncated at byte 376",  # the prefix runs past the end
            lambda rec, idx, offsets: rec.write_bytes(rec.read_bytes()[:offsets[8] + 4])),
        5: ("offset 1000000000 is outside the file's 472 bytes",
            lambda rec, idx, offsets: write_offsets(idx, offsets[:5] + [10**9] + offsets[6:])),
        2: ("offset -381 is outside",  # negative: as an index from the end of the bulk read, record 2
            lambda rec, idx, offsets: write_offsets(idx, offsets[:2] + [offsets[2] + 3 - 472] + offsets[3:])),
        7: ("no magic number at byte 330",  # an offset off the 4-byte grid, inside record 7
            lambda rec, idx, offsets: write_offsets(idx, offsets[:7] + [offsets[7] + 2] + offsets[8:])),
        1: ("no magic number at byte 461",  # the first offset whose 3 words would overrun the file
            lambda rec, idx, offsets: write_offsets(idx, offsets[:1] + [472 - 11] + offsets[2:])),
    }
    for key, (why, change) in cases.items():
        message = corrupt(tmp_path, change)
        assert re.match(named.format(key) + re.escape(why), message), (key, message)


def test_the_first_corrupt_record_is_named(tmp_path):
    def two_bad_records(rec, idx, offsets):
        patch(rec, offsets[7], bytes(4))
        patch(rec, offsets[2], bytes(4))
    assert "corrupt RecordIO record 2 " in corrupt(tmp_path, two_bad_records)


@pytest.mark.parametrize("text, message", [("", "has no records"), ("\n \n", "has no records"),
                                           ("0\t0\n1\n", "is not a RecordIO index"),
                                           ("0\t0\n1\t4.5\n", "is not a RecordIO index"),
                                           ("0\t0\n1\t\xe9\n", "is not a RecordIO index")])
def test_index_text(tmp_path, text, message):
    _, idx, _ = write_files(tmp_path, [b"jpeg"], [1])
    idx.write_text(text)
    with pytest.raises(ValueError, match=f"{re.escape(str(idx))} {message}"):
        read_recordio(str(tmp_path), 16)


# ----------------------------------------------------------------------------- the benchmark

bench = bench_script("recordio_labels")


@pytest.mark.parametrize("records", [1, bench.IMAGES_PER_ID + 3])
def test_benchmark_files_are_what_write_recordio_writes(tmp_path, records):
    bench.write_generated(tmp_path / "bench.rec", tmp_path / "bench.idx", records)
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", [bench.FAKE_IMAGE] * records,
                   [k // bench.IMAGES_PER_ID for k in range(records)])
    assert (tmp_path / "bench.rec").read_bytes() == (tmp_path / "train.rec").read_bytes()
    assert (tmp_path / "bench.idx").read_text() == (tmp_path / "train.idx").read_text()


def test_benchmark_prints_one_line(capsys):
    bench.main(["--records", "1K"])
    assert re.fullmatch(r"RecordIO labels of 1K records: [\d.]+ s, \S+ records/s; .+, \d+ cores, "
                        r"\d{4}-\d\d-\d\d\n", capsys.readouterr().out)
