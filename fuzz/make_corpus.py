#!/usr/bin/env python3
"""Writes the seed corpus of fuzz/fuzz_conn.c into fuzz/corpus/ (one small program per file).

Each seed is a valid conversation that reaches one interesting state of a native connection;
libFuzzer mutates from there. The encoding is the one fuzz_conn.c reads (fuzz/README.md):
six option bytes, then ops (op | slot << 4 | variant << 6, then the op's arguments).

    python3 fuzz/make_corpus.py [outdir]     (default: fuzz/corpus next to this script)
"""
import hashlib
import os
import sys

# Option indices (tables in fuzz_conn.c: set_options).
READ_LIMIT = {0: 0, 64: 1, 300: 2, 1000: 3, 4096: 4, 9000: 5, 65536: 6, 1 << 20: 7}
MAX_MSG = {0: 0, 1: 1, 125: 2, 200: 3, 1000: 4, 5000: 5, 65536: 6, 1 << 20: 7}
EVQ = {0: 0, 256: 1, 1000: 2, 4096: 3, 20000: 4, 100000: 5, 1 << 20: 6, 1 << 30: 7}
MAX_QUEUE = {0: 0, 100: 1, 1000: 2, 10000: 3, 100000: 4, 1 << 20: 5, 1 << 24: 6, 1 << 30: 7}
HIGH_WATER = {0: 0, 50: 1, 500: 2, 5000: 3, 65536: 4, 1 << 20: 5, 1 << 24: 6, 1 << 30: 7}
PING_EVERY_TURN, PING_STALE = 1, 2
CLOSE_TIMEOUT_0, SEND_TIMEOUT_0, SMALL_SRV_SNDBUF, SMALL_PEER_SNDBUF = 4, 8, 16, 32
COMPRESS_ALL = 64  # compress_threshold 0 (else 256)

SIZE_TAB = [64, 100, 125, 126, 127, 200, 255, 256, 1000, 1024, 2000, 4077, 4078, 4090, 4096,
            4097, 8192, 16000, 65535, 65536, 65537, 100000, 270000, 300000]
SEND_SIZES = [0, 1, 10, 100, 125, 126, 1000, 4096, 5000, 16384, 65535, 65536, 70000, 100000]
CLOSE_CODES = [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012,
               1013, 1014, 1015, 1016, 2999, 3000, 3999, 4000, 4999, 5000, 0, 65535, 999]
CLOSE_EMPTY, CLOSE_LONE_BYTE = len(CLOSE_CODES), len(CLOSE_CODES) + 1
OUR_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4000,
             4999]

# payload content modes
RAW, UTF8, BAD_UTF8, AS = 0, 1, 2, 3
# data frame opcode selectors (fuzz_conn.c ops[]); length encodings
CONT, TEXT, BIN, RESERVED, RESERVED_CTL = 0, 1, 2, 5, 6
SHORTEST, ENC16, ENC64, ENC64_TOP = 0, 1, 2, 3
KEY = b"\x11\x22\x33\x44"


def size_sel(n):
    if n < 40:
        return n
    return 40 + SIZE_TAB.index(n)


class Prog:
    def __init__(self, read_limit=1 << 20, max_msg=1 << 20, evq=1 << 30, max_queue=1 << 24,
                 high_water=1 << 20, flags=0):
        self.b = bytearray([READ_LIMIT[read_limit], MAX_MSG[max_msg], EVQ[evq],
                            MAX_QUEUE[max_queue], HIGH_WATER[high_water], flags])

    def op(self, op, slot=0, v=0, *args):
        self.b.append(op | slot << 4 | v << 6)
        for a in args:
            if isinstance(a, (bytes, bytearray)):
                self.b += a
            else:
                self.b.append(a & 0xFF)
        return self

    @staticmethod
    def src(data):
        assert len(data) < 64
        return bytes([len(data)]) + bytes(data)

    # client frames (appended to the slot's pending bytes)
    def data(self, slot, opsel, size, mode=UTF8, src=b"hello", fin=True, rsv=0, masked=True,
             enc=SHORTEST, at=0, deflate=None, bfinal=False):
        """at (BAD_UTF8): defect kind in bits 0-2 (0 = a 0xff byte), position in bits 3-5.
        rsv: 1 RSV3, 2 RSV2. deflate: RSV1 set and the payload compressed at that zlib level
        (0-6, 7 = 9), "raw": RSV1 on the payload as it is; bfinal: ending in a final block."""
        h = opsel | (0 if fin else 8) | rsv << 4 | (0 if masked else 0x40)
        m = mode | at << 2
        if deflate is not None:
            h |= 0x80
            m = mode | (4 if deflate == "raw" else (deflate & 7) << 4) | (8 if bfinal else 0)
        return self.op(1, slot, 0, h, size_sel(size) | enc << 6, m, KEY, self.src(src))

    def ping(self, slot, n=4, src=b"ping", pong=False, flags=0):
        return self.op(2, slot, 1 if pong else 0, flags, n, UTF8, self.src(src))

    def close(self, slot, code=1000, reason=b"bye", mode=UTF8, flags=0):
        """code: one of CLOSE_CODES, or CLOSE_EMPTY / CLOSE_LONE_BYTE."""
        sel = code if code in (CLOSE_EMPTY, CLOSE_LONE_BYTE) else CLOSE_CODES.index(code)
        return self.op(2, slot, 2, flags, len(reason), mode, self.src(reason), sel)

    def close_raw(self, slot, code, reason=b"", mode=RAW):
        return self.op(2, slot, 3, 0, len(reason), mode, self.src(reason), code >> 8, code & 0xFF)

    def raw(self, slot, data):
        return self.op(3, slot, 0, len(data), data)

    def frag(self, slot, binary, size, cuts, pings=0, mode=UTF8, src="héllo wörld €𝄞".encode(),
             deflate=False, bfinal=False):
        """cuts: split offsets in bytes of the message (each encoded as a byte, offset*256/size).
        deflate: the message is compressed, then split at the same proportions."""
        a = (1 if binary else 0) | mode << 1 | (len(cuts)) << 3
        enc = bytes(min(255, (c * 256 + size - 1) // size) for c in cuts)
        sel = size_sel(size) | (0x40 if deflate else 0) | (0x80 if bfinal else 0)
        return self.op(14, slot, 0, a, pings, sel, enc, KEY, self.src(src))

    # client socket
    def register(self, slot=0, leftover=0, n=0, resp101=False, deflate=0, takeover=False):
        """leftover: 0 none, 1 all pending bytes, 2 the first n (< 128), 3 none, pending written
        before the REGISTER runs; resp101: the engine writes a 101 response first; deflate:
        permessage-deflate negotiated with that window (8-15), 0 not; takeover: the client keeps
        its window (it may follow a fan-out's shared context)."""
        if deflate:
            n |= 64 | (0 if deflate == 15 else 32 | (deflate - 8)) | (16 if takeover else 0)
        return self.op(0, slot, leftover, n | (128 if resp101 else 0))

    def write(self, slot, sel=7):
        return self.op(4, slot, 0, sel)

    def iterate(self, turns=1, write=True):
        return self.op(5, 0, turns - 1 if write else 3)

    def take(self):
        return self.op(6)

    def ack(self, slot, how=0, arg=0):
        return self.op(7, slot, how, arg)

    def drain(self, slot, all_=True):
        return self.op(8, slot, 1 if all_ else 0)

    def shut_wr(self, slot):
        return self.op(9, slot)

    def close_peer(self, slot, drain_first=True):
        return self.op(10, slot, 1 if drain_first else 0)

    # app
    def app_close(self, slot, code=1000, reason=b"", why=0):
        return self.op(11, slot, why, OUR_CODES.index(code), len(reason), self.src(reason))

    def send(self, slot, binary, size, src=b"srv", fanout=False):
        """fanout: to every registration for slot 0, else to those whose index i has bit i % 3
        of slot set."""
        a = (1 if binary else 0) | SEND_SIZES.index(size) << 1
        return self.op(13 if fanout else 12, slot, 0, a, self.src(src))

    def turn(self, n=1):
        return self.op(15, 0, n - 1)


def seeds():
    s = {}
    s["text_echo"] = (Prog().register(0, resp101=True).data(0, TEXT, 5).iterate().take().ack(0)
                      .send(0, False, 10, "héllo".encode()).turn(2))
    s["binary"] = (Prog().register(0).data(0, BIN, 200, RAW, b"\x00\xff\x10")
                   .data(0, BIN, 0, RAW).iterate().take().ack(0, 1).turn())
    s["fragmented_pings"] = (Prog().register(0)
                             .frag(0, False, 100, [7, 40, 41, 90], pings=0b1011).turn(2))
    s["fragmented_big"] = Prog().register(0).frag(0, True, 65537, [1, 128, 255], RAW).turn(4)
    s["ping_pong"] = Prog().register(0).ping(0).ping(0, 0, b"").ping(0, 4, b"pong", pong=True).turn(2)
    s["close_normal"] = (Prog().register(0).data(0, TEXT, 3).close(0, 1000, b"done").turn(2)
                         .close_peer(0))
    s["close_no_code"] = Prog().register(0).close(0, CLOSE_EMPTY, b"").turn(2)
    s["close_bad_codes"] = (Prog().register(0).close(0, 1005, b"").register(1).close(1, 999)
                            .register(2).close(2, CLOSE_LONE_BYTE, b"").register(3).close(3, 1015)
                            .turn(2))
    s["close_3xxx_4xxx"] = (Prog().register(0).close(0, 4999, "€".encode())
                            .register(1).close(1, 1014, b"x").register(2).close(2, 3000).turn(2))
    # The row: a Close whose invalid reason straddles wslay's 4096-byte read buffer.
    s["close_reason_straddle"] = (Prog().register(0).data(0, BIN, 4078, AS)
                                  .close(0, 1000, b"\xff\xfe", RAW).turn(2))
    s["close_reason_bad_utf8"] = Prog().register(0).close(0, 1001, b"ab\xc0\x80", RAW).turn(2)
    s["len_2p63"] = Prog().register(0).data(0, BIN, 100, AS, enc=ENC64_TOP).turn(2)
    s["len_nonminimal16"] = Prog().register(0).data(0, TEXT, 5, enc=ENC16).turn(2)
    s["len_nonminimal64"] = Prog().register(1).data(1, BIN, 1000, AS, enc=ENC64).turn(2)
    s["too_big"] = Prog(max_msg=125).register(0).data(0, TEXT, 200, AS).turn(2)
    s["too_big_fragments"] = Prog(max_msg=1000).register(0).frag(0, True, 2000, [100, 900, 1500], RAW).turn(3)
    s["text_bad_utf8"] = Prog().register(0).data(0, TEXT, 39, BAD_UTF8, "aé€".encode(), at=8 * 3).turn(2)
    s["text_utf8_split"] = (Prog().register(0).frag(0, False, 20, [1, 2, 3, 5, 8, 13, 17],
                                                    src="€𝄞é".encode()).turn(2))
    s["reserved_bits"] = (Prog().register(0).data(0, TEXT, 5, rsv=1).register(1)
                          .data(1, RESERVED, 3).register(2).data(2, BIN, 3, masked=False)
                          .register(3).data(3, CONT, 3).turn(2))
    s["control_bad"] = (Prog().register(0).ping(0, 126, b"x").register(1).ping(1, 2, b"x", flags=1)
                        .turn(2))
    p = Prog(read_limit=1000)
    p.register(0)
    for _ in range(12):
        p.data(0, TEXT, 10, AS)
    s["read_pause"] = p.iterate(2).take().iterate().take().ack(0).iterate().take().ack(0).turn(2)
    p = Prog(read_limit=300)
    p.register(0).data(0, BIN, 4090, AS).data(0, BIN, 4090, AS).data(0, BIN, 5, RAW)
    s["read_pause_held"] = p.iterate().take().ack(0, 1).iterate().take().ack(0).turn(3)
    p = Prog(evq=1000)
    p.register(0).register(1)
    for _ in range(6):
        p.data(0, TEXT, 30, AS).data(1, BIN, 30, AS)
    s["event_queue_full"] = p.iterate(3).take().iterate().take().ack(0).ack(1).turn(2)
    s["slow_consumer"] = (Prog(max_queue=10000, high_water=5000, flags=SEND_TIMEOUT_0 | SMALL_SRV_SNDBUF)
                          .register(0).send(0, True, 70000).iterate(2).take().turn())
    s["write_pause_resume"] = (Prog(high_water=5000, flags=SMALL_SRV_SNDBUF).register(0)
                               .send(0, False, 16384).iterate().take().drain(0).iterate()
                               .drain(0).iterate().take().turn(2))
    pongs = Prog(max_queue=1000, flags=SMALL_SRV_SNDBUF)
    pongs.register(0)
    for _ in range(30):
        pongs.ping(0, 100, b"abcdefgh")
    s["pong_flood"] = pongs.iterate(3).take().turn()
    s["leftover"] = (Prog().data(0, TEXT, 5).data(0, BIN, 256, RAW, b"\x01").register(0, 2, 9, True)
                     .iterate().take().turn(2))
    s["leftover_all"] = Prog().data(0, TEXT, 5).close(0, 1000).register(0, 1).turn(2)
    s["close_bytewise"] = (Prog().register(0).close(0, 1001, "bye é".encode()).write(0, 0).iterate(write=False)
                           .write(0, 1).iterate(write=False).write(0, 2).iterate(write=False)
                           .write(0, 7).iterate(write=False).turn(2))
    s["app_close"] = (Prog().register(0).app_close(0, 1001, "going away ✓".encode()).iterate().drain(0)
                      .close(0, 1001).turn(2))
    s["app_close_linger"] = Prog().register(0).app_close(0, 4000, why=2).turn(2).close_peer(0, False).turn()
    s["ping_keepalive"] = Prog(flags=PING_EVERY_TURN).register(0).turn(2).ping(0, 0, b"", pong=True).turn(2)
    s["ping_stale"] = Prog(flags=PING_STALE).register(0).iterate().turn(2)
    s["close_timeout"] = Prog(flags=CLOSE_TIMEOUT_0).register(0).app_close(0, 1000).iterate(3).turn()
    s["half_close"] = Prog().register(0).data(0, TEXT, 5).iterate().shut_wr(0).turn(2)
    s["peer_reset"] = Prog().register(0).send(0, True, 1000).iterate().close_peer(0, False).turn(2)
    s["fanout"] = (Prog().register(0).register(1).register(2).send(0, False, 100, "é".encode(), fanout=True)
                   .data(1, TEXT, 5).turn(2).send(0, True, 5000, fanout=True).turn(2))
    s["reregister"] = (Prog().register(0).data(0, TEXT, 5).iterate().register(0).data(0, TEXT, 5)
                       .turn(2))
    s["raw_garbage"] = Prog().register(0).raw(0, b"GET / HTTP/1.1\r\n\r\n\x81\x85").turn(2)
    # permessage-deflate (csrc/deflate.c)
    s["deflate_echo"] = (Prog().register(0, deflate=15).register(1)
                         .data(0, TEXT, 1000, UTF8, "héllo wörld ".encode(), deflate=6)
                         .data(0, BIN, 8192, AS, deflate=1).data(0, TEXT, 5)
                         .turn().send(0, False, 5000, b"compress me ", fanout=True)
                         .send(0, True, 100, fanout=True).send(0, False, 4096, b"direct ").turn(2))
    s["deflate_bomb"] = Prog(max_msg=1000).register(0, deflate=15).data(0, BIN, 300000, AS,
                                                                      deflate=7).turn(3)
    s["deflate_bomb_fragments"] = (Prog(max_msg=5000).register(0, deflate=15)
                                   .frag(0, True, 270000, [10, 100000, 200000], 0b10, AS, src=b"",
                                         deflate=True).turn(4))
    s["deflate_fragments"] = (Prog().register(0, deflate=15)
                              .frag(0, False, 16000, [1, 2, 3, 900, 8000], 0b101, deflate=True)
                              .frag(0, True, 2000, [1000], 0, RAW, deflate=True, bfinal=True).turn(3))
    s["deflate_rsv1_refused"] = (Prog().register(0).data(0, TEXT, 5, deflate=6).register(1, deflate=15)
                                 .data(1, BIN, 5, RAW, fin=False).data(1, CONT, 5, RAW, deflate=6)
                                 .register(2, deflate=15).ping(2, 1, b"x", flags=2 | 4 << 2)
                                 .turn(2))
    s["deflate_garbage"] = (Prog().register(0, deflate=15).data(0, BIN, 39, RAW, b"\xff\xfe", deflate="raw")
                            .register(1, deflate=15).data(1, TEXT, 39, BAD_UTF8, "aé".encode(),
                                                          deflate=6).turn(2))
    s["deflate_windows"] = (Prog(flags=COMPRESS_ALL).register(0, deflate=9).register(1, deflate=8)
                            .register(2, deflate=15).register(3)
                            .send(0, False, 1000, b"aaaa ", fanout=True)
                            .send(0, False, 125, b"bbbb ", fanout=True)
                            .send(1, True, 10, b"c", fanout=True).turn(3))
    # shared contexts: three clients that keep their window, one that does not, one plain;
    # fan-outs to all and to a subset, a direct message in between
    s["deflate_shared"] = (Prog().register(0, deflate=15, takeover=True)
                           .register(1, deflate=15, takeover=True).register(2, deflate=15)
                           .register(3, deflate=15, takeover=True)
                           .send(0, False, 1000, b"chat ", fanout=True)
                           .send(0, False, 1000, b"chat ", fanout=True)
                           .send(1, False, 4096, b"direct ").send(0, True, 5000, b"snap ", fanout=True)
                           .send(5, False, 1000, b"room ", fanout=True)
                           .send(0, False, 1000, b"chat ", fanout=True).turn(3))
    s["deflate_read_pause"] = (Prog(read_limit=1000).register(0, deflate=15)
                               .data(0, BIN, 100000, AS, deflate=6)
                               .data(0, BIN, 100000, AS, deflate=6).iterate(2).take()
                               .ack(0).turn(3))
    return s


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    os.makedirs(out, exist_ok=True)
    for name, prog in sorted(seeds().items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(bytes(prog.b))
    print(f"{len(seeds())} seeds in {out}")


if __name__ == "__main__":
    main()
