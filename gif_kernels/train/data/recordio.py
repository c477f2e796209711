"""insightface / MXNet IndexedRecordIO files (train.rec with train.idx): reading, memory-mapped and
checked against crafted files, and writing (for tests and small datasets)."""
import io
import mmap
import os
import struct
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import decode_image, pillow

# insightface / MXNet IndexedRecordIO: records of [magic, lrecord, payload, padding to 4 bytes];
# lrecord holds a continuation flag (top 3 bits) and the payload length (low 29 bits).
RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2; then `flag` float32 labels if flag > 0
_HEADER_BYTES = _IR_HEADER.size + 4  # the most payload a header takes up to its label's end


def _label_layout(flag):
    """(payload offset of the label, payload bytes the header needs) of records with IR header flag
    `flag`, an int or an array: the first extra label when flag > 0, else the header's own at 4."""
    extra = flag > 0
    return 4 + extra * (_IR_HEADER.size - 4), _IR_HEADER.size + 4 * extra


def _recordio_parts(payload: bytes) -> list:
    """The parts a RecordIO writer stores payload as: cut at each 4-byte-aligned occurrence of the
    magic number, which is dropped (the reader puts it back), so magic only ever starts a record."""
    words = np.frombuffer(payload, "<u4", count=len(payload) // 4)
    starts = [0] + [4 * int(at) + 4 for at in np.flatnonzero(words == RECORDIO_MAGIC)]
    ends = [start - 4 for start in starts[1:]] + [len(payload)]
    return [payload[start:end] for start, end in zip(starts, ends)]


def write_recordio(path_rec: str, path_idx: str, images: list, labels: list, image_format: str = "png",
                   header_record: bool = True):
    """Write images with integer labels as insightface RecordIO (.rec and .idx).

    Each image is a uint8 (H, W, 3) array, encoded as image_format ("png" or "jpeg"), or the bytes
    of an already encoded image, stored as they are. With header_record (as in insightface's
    datasets), record 0 is a header with flag 2 and labels (n + 1, n + 1) and the images are
    records 1..n; without, the images are records 0..n-1.
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    records = []
    if header_record:
        n = len(images)
        records.append(_IR_HEADER.pack(2, 0.0, 0, 0) + struct.pack("<2f", n + 1, n + 1))
    for image, label in zip(images, labels):
        if not isinstance(image, bytes):
            encoded = io.BytesIO()
            pillow().fromarray(np.asarray(image, np.uint8)).save(encoded, format=image_format)
            image = encoded.getvalue()
        records.append(_IR_HEADER.pack(0, float(label), len(records), 0) + image)
    with open(path_rec, "wb") as rec, open(path_idx, "w") as idx:
        for key, payload in enumerate(records):
            idx.write(f"{key}\t{rec.tell()}\n")
            parts = _recordio_parts(payload)
            # Part flags: 0 a whole record, else 1 its first part, 2 a middle one, 3 the last.
            flags = [0] if len(parts) == 1 else [1] + [2] * (len(parts) - 2) + [3]
            for flag, part in zip(flags, parts):
                rec.write(struct.pack("<II", RECORDIO_MAGIC, flag << 29 | len(part)))
                rec.write(part + bytes(-len(part) % 4))


class _RecordIO(Dataset):
    """The image records of an insightface RecordIO file, read by offset (no MXNet needed)."""

    def __init__(self, path_rec: str, path_idx: str, image_size: int):
        self.path_rec, self.image_size = path_rec, image_size
        self.input_shape = (3, image_size, image_size)
        self._map = None
        with open(path_idx, "rb") as file:
            text = file.read()
        if not text or text.isspace():  # which np.fromstring would read as one 0
            raise ValueError(f"data: {path_idx} has no records")
        # Parsed in C, without a Python string per number (two per record, gigabytes at 42M records).
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)  # numpy 1.x only warns at unparsed text
                table = np.fromstring(text, dtype=np.int64, sep=" ").reshape(-1, 2)
        except (ValueError, DeprecationWarning) as error:
            raise ValueError(f"data: {path_idx} is not a RecordIO index of 'key<TAB>offset' lines") from error
        # Records in index order, then, as insightface's MXFaceDataset does, keys 1 .. label[0] - 1
        # when record 0 is a header (flag > 0).
        self.keys, self.offsets = table[:, 0], table[:, 1]
        if 0 in self.keys:
            flag, label = self._header(int(np.flatnonzero(self.keys == 0)[0]))
            if flag > 0:
                self._select(np.arange(1, int(label)), path_idx)

    def _select(self, keys: np.ndarray, path_idx: str):
        """Keep just the records `keys`, in that order."""
        order = np.argsort(self.keys)
        found = order[np.minimum(np.searchsorted(self.keys, keys, sorter=order), len(order) - 1)]
        if np.any(self.keys[found] != keys):
            raise ValueError(f"data: {path_idx} lacks some of records 1..{len(keys)} that its header "
                             f"record 0 announces")
        self.keys, self.offsets = keys, self.offsets[found]

    def __getstate__(self):  # the memory map is reopened in each process that unpickles this
        return {**self.__dict__, "_map": None}

    def __len__(self):
        return len(self.keys)

    def _bytes(self):
        if self._map is None:
            with open(self.path_rec, "rb") as file:
                empty = os.fstat(file.fileno()).st_size == 0  # which mmap refuses
                self._map = b"" if empty else mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def _corrupt(self, index: int, why: str) -> ValueError:
        key = int(self.keys[index])
        return ValueError(f"data: corrupt RecordIO record {key} in {self.path_rec}: {why}")

    def _payload(self, index: int, size: int | None = None) -> bytes:
        """Record index's payload, or just enough of it for its first `size` bytes."""
        data, at, parts, have = self._bytes(), int(self.offsets[index]), [], 0
        if not 0 <= at <= len(data):
            raise self._corrupt(index, f"offset {at} is outside the file's {len(data)} bytes")
        while True:
            if at + 8 > len(data):
                raise self._corrupt(index, f"truncated at byte {at}")
            magic, lrecord = struct.unpack_from("<II", data, at)
            flag, length = lrecord >> 29, lrecord & (1 << 29) - 1
            if magic != RECORDIO_MAGIC:
                raise self._corrupt(index, f"no magic number at byte {at}")
            if flag not in ((2, 3) if parts else (0, 1)):
                raise self._corrupt(index, f"part flag {flag} out of sequence at byte {at}")
            if at + 8 + length > len(data):
                raise self._corrupt(index, f"truncated at byte {len(data)}")
            parts.append(data[at + 8:at + 8 + length])
            have += length
            if flag in (0, 3) or (size is not None and have >= size):
                return _MAGIC_BYTES.join(parts)
            at += 8 + length + (-length % 4)

    def _header(self, index: int):
        """(flag, label) of record index: label is the first of the extra labels when flag > 0."""
        head = self._payload(index, _HEADER_BYTES)
        flag = struct.unpack_from("<I", head)[0] if len(head) >= 4 else 0
        label_at, needed = _label_layout(flag)
        if len(head) < needed:
            raise self._corrupt(index, "shorter than its header")
        return flag, struct.unpack_from("<f", head, label_at)[0]

    def labels(self) -> np.ndarray:
        """The label of every image record, as _header reads it: in bulk for the records whose header
        lies in their first part, record by record for the rest (a header that the magic number cuts
        into parts, or a corrupt record, which raises as _header does)."""
        data, label = self._bytes(), np.empty(len(self), np.float32)
        done = np.zeros(len(self), bool)
        # Each record's first three words (magic, lrecord, the IR header's flag) are read where they
        # lie in the file; its label only where the record holds it, so inside the file too.
        bulk = np.flatnonzero((self.offsets >= 0) & (self.offsets <= len(data) - 12))
        if len(bulk):
            at = self.offsets[bulk]
            words = np.ndarray((len(data) - 3,), "<u4", buffer=data, strides=(1,))  # the uint32 at each byte
            magic, lrecord, flag = words[at], words[at + 4], words[at + 8]
            part, length = lrecord >> 29, lrecord & (1 << 29) - 1
            label_at, needed = _label_layout(flag)
            # _payload stops after the first part when that is the whole record (part flag 0) or the
            # first of several (1) with _HEADER_BYTES of the payload.
            found = ((magic == RECORDIO_MAGIC) & (at + 8 + length <= len(data))
                     & np.where(part == 0, length >= needed, (part == 1) & (length >= _HEADER_BYTES)))
            label[bulk[found]] = words[at[found] + 8 + label_at[found]].view(np.float32)
            done[bulk[found]] = True
        for index in np.flatnonzero(~done):
            label[index] = self._header(index)[1]
        return label.astype(np.int64)

    def __getitem__(self, index: int) -> torch.Tensor:
        flag, _ = self._header(index)
        encoded = self._payload(index)[_IR_HEADER.size + 4 * flag:]
        name = f"record {int(self.keys[index])} of {self.path_rec}"
        return decode_image(io.BytesIO(encoded), self.image_size, name)


def read_recordio(path: str, image_size: int):
    """PATH is a folder with train.rec and train.idx, or a .rec file with its .idx beside it."""
    if os.path.isdir(path):
        path_rec, path_idx = os.path.join(path, "train.rec"), os.path.join(path, "train.idx")
    else:
        path_rec, path_idx = path, os.path.splitext(path)[0] + ".idx"
    for file in (path_rec, path_idx):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"data: RecordIO file {file} not found (expected a folder with "
                                    f"train.rec and train.idx, or a .rec with its .idx beside it)")
    records = _RecordIO(path_rec, path_idx, image_size)
    # Every rank of a torchrun job reads the labels itself rather than rank 0 broadcasting them: in
    # bulk that takes seconds at tens of millions of records, the ranks of a machine share the file's
    # page cache, and a corrupt file raises the same error on every rank instead of leaving the others
    # waiting for a broadcast.
    values, identity = np.unique(records.labels(), return_inverse=True)
    return records, identity, [str(value) for value in values]
