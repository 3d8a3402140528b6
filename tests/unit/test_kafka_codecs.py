"""kafka-python can read record batches of every codec Kafka defines (its codec libraries are installed)."""

from __future__ import annotations

import pytest
from kafka import codec
from kafka.record import MemoryRecords, MemoryRecordsBuilder

# Kafka's compression type ids in the record batch attributes.
CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def test_every_codec_library_is_importable() -> None:
    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()


def test_record_batch_checksums_use_the_c_crc32c() -> None:
    """kafka-python checks a CRC-32C over every fetched batch and writes one into every produced batch; its
    pure-Python fallback runs at about 7 MB/s, which made it 3.5x slower here (the `crc32c` extra)."""
    from kafka.record import util
    from kafka.record._crc32c import crc as pure_python

    assert util.crc32c_c is not None, "install kafka-python[crc32c] (the C crc32c package)"
    data = bytes(range(256)) * 64
    assert util.calc_crc32c(memoryview(data)) == pure_python(memoryview(data))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_a_compressed_batch_decodes_to_the_records_written(name: str) -> None:
    values = [b'{"id": "e-%d", "duration": %d}' % (i, i) for i in range(50)]
    builder = MemoryRecordsBuilder(magic=2, compression_type=CODECS[name], batch_size=1 << 20)
    for offset, value in enumerate(values):
        builder.append(timestamp=1_700_000_000_000 + offset, key=b"\x00\xffkey", value=value, headers=[("h", b"v")])
    builder.close()
    records = MemoryRecords(builder.buffer())
    batch = records.next_batch()
    assert batch.compression_type == CODECS[name]
    got = list(batch)
    assert [r.value for r in got] == values
    assert got[0].key == b"\x00\xffkey" and got[0].headers == [("h", b"v")]
