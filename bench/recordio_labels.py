"""RecordIO indexing: seconds until read_recordio has the labels of every record (the .idx parsed,
the header record read, each record's label read from the memory-mapped .rec), on a generated file
laid out as insightface's: a header record, then N image records of a few bytes each, with
IMAGES_PER_ID consecutive records per identity. The file is fresh, so it is in the page cache.

    python bench/recordio_labels.py                    # 1M records
    python bench/recordio_labels.py --records 42M      # WebFace42M's count (1.5 GB of .rec)
"""
import datetime
import os
import platform
import struct
import tempfile
import time

import numpy as np

from gif_kernels.cli import ArgumentParser, one_line_errors
from gif_kernels.train.data.recordio import RECORDIO_MAGIC, read_recordio
from harness import format_count, parse_count

IMAGES_PER_ID = 20  # about WebFace42M's 42M images of 2M identities
FAKE_IMAGE = b"\xff\xd8\xff\xd9"  # a JPEG's start and end markers: 4 bytes, so no padding follows
# One image record: magic, lrecord (part flag 0 and the payload length), then the payload: the IR
# header (flag 0, label, id, id2) and the image.
IMAGE_RECORD = np.dtype([("magic", "<u4"), ("lrecord", "<u4"), ("flag", "<u4"), ("label", "<f4"),
                         ("id", "<u8"), ("id2", "<u8"), ("image", "u1", len(FAKE_IMAGE))])


def write_generated(path_rec, path_idx, records):
    """What write_recordio writes for `records` FAKE_IMAGE payloads with labels k // IMAGES_PER_ID
    and a header record, built with numpy in one piece instead of record by record."""
    header_payload = struct.pack("<IfQQ2f", 2, 0.0, 0, 0, records + 1, records + 1)
    header = struct.pack("<II", RECORDIO_MAGIC, len(header_payload)) + header_payload
    body = np.zeros(records, IMAGE_RECORD)
    body["magic"] = RECORDIO_MAGIC
    body["lrecord"] = IMAGE_RECORD.itemsize - 8
    body["label"] = np.arange(records) // IMAGES_PER_ID
    body["id"] = np.arange(1, records + 1)
    body["image"] = np.frombuffer(FAKE_IMAGE, np.uint8)
    with open(path_rec, "wb") as rec:
        rec.write(header)
        rec.write(body.data)
    offsets = [0] + (len(header) + IMAGE_RECORD.itemsize * np.arange(records)).tolist()
    with open(path_idx, "w") as idx:
        idx.write("".join(map("{}\t{}\n".format, range(records + 1), offsets)))


def processor():
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=parse_count, default=1_000_000, help="image records, e.g. 1M")
    args = parser.parse_args(argv)
    with one_line_errors(), tempfile.TemporaryDirectory() as folder:
        write_generated(os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx"), args.records)
        start = time.perf_counter()
        read_recordio(folder, image_size=112)
        seconds = time.perf_counter() - start
    print(f"RecordIO labels of {format_count(args.records)} records: {seconds:.2f} s, "
          f"{format_count(round(args.records / seconds))} records/s; {processor()}, {os.cpu_count()} cores, "
          f"{datetime.date.today().isoformat()}")


if __name__ == "__main__":
    main()
