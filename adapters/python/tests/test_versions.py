"""Rolling upgrades, the wrong order: a worker of this release against a
sidecar of the previous protocol version (it refuses the newer client's
Hello with VersionMismatch, as every tidecached refuses a version it does
not speak). The adapter runs from its base storage, uncached, and says so
in its log: the lines docs/operations.md ("Upgrades") quotes."""

import logging
import os
import socket
import struct
import threading

import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

import tidecache
from tidecache import TideCacheStorage


def _msgpack_str(s):
    b = s.encode()
    if len(b) < 32:
        return bytes([0xA0 | len(b)]) + b
    return bytes([0xD9, len(b)]) + b


class OldSidecar:
    """A sidecar of protocol version PROTOCOL_VERSION - 1 as far as a newer
    client sees it: it answers every Hello with VersionMismatch (in the
    previous version's own words: "protocol version 7 is not 6") and closes
    the connection. The answer is hand-encoded MessagePack (the wire format
    of docs/protocol.md): ``[id, {"Error": ["VersionMismatch", message, nil]}]``."""

    def __init__(self, path):
        self.path = path
        self.hellos = 0
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(path)
        self.server.listen(16)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        old = tidecache._native.PROTOCOL_VERSION - 1
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                try:
                    head = conn.recv(4, socket.MSG_WAITALL)
                    body = conn.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL)
                except (OSError, struct.error):
                    continue
                # body = [id, {"Hello": [version, client]}]: the id's
                # encoding follows the array marker (0x92); echoed as is.
                marker = body[1]
                size = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}.get(marker, 1)
                id_bytes = body[1:1 + size]
                version = body[1 + size:].split(b"Hello", 1)[1][1]  # fixarray, then a positive fixint
                self.hellos += 1
                message = "protocol version %d is not %d" % (version & 0x7F, old)
                answer = (b"\x92" + id_bytes + b"\x81" + _msgpack_str("Error") + b"\x93"
                          + _msgpack_str("VersionMismatch") + _msgpack_str(message) + b"\xc0")
                conn.sendall(struct.pack(">I", len(answer)) + answer)

    def close(self):
        self.server.close()


def test_a_newer_worker_runs_uncached_against_an_older_sidecar_and_says_why(tmp_path, caplog):
    old = OldSidecar(str(tmp_path / "old.sock"))
    caplog.set_level(logging.INFO, logger="tidecache")
    try:
        base = ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs"))
        storage = TideCacheStorage(base, socket=old.path)
        db = ZODB.DB(storage, cache_size=0)
        with db.transaction() as c:
            c.root()["doc"] = PersistentMapping(x=1)
        for _ in range(3):
            conn = db.open()
            conn.cacheMinimize()
            assert conn.root()["doc"]["x"] == 1  # from the base storage
            conn.close()
        stats = storage.cache_stats()
        assert stats["hits"] == 0 and stats["misses"] > 0 and not stats["joined"], stats
        db.close()
    finally:
        old.close()
    assert old.hellos >= 1
    new = tidecache._native.PROTOCOL_VERSION
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    refused = [line for line in lines if "sidecar unavailable, running from the base storage" in line]
    assert refused, lines
    # The sidecar's own words, then the client's: what to do.
    assert ("tidecached refused the request (VersionMismatch): protocol version %d is not %d "
            "(this client speaks protocol version %d; a tidecached accepts clients of its own protocol "
            "version and of the previous one, so upgrade tidecached before the workers; until then this "
            "process runs from its storage, uncached)" % (new, new - 1, new)) in refused[0], refused[0]
    # That line starts the run of fallbacks: no other WARNING after it.
    assert len(lines) == 1, lines
    assert os.path.exists(str(tmp_path / "Data.fs"))
