#!/usr/bin/env python3
"""Captures the netlink messages nft exchanges with the kernel, for nftables mode's encoder
tests (src/dataplane/nftables/netlink/testdata/). Run as root; uses a throwaway network
namespace and strace.

usage: scripts/nft-capture.py FILE.nft [SETUP.nft]  > vectors.txt

Each command of FILE.nft (one per line) is one message of nft's batch; the output has one line
per message sent ("> COMMAND" then its hex) followed by what the kernel lists back for
`nft list ruleset` ("< list TYPE" then hex). SETUP.nft is applied first, uncaptured.
"""
import os, re, struct, subprocess, sys, tempfile

def messages(buf):
    i = 0
    while i + 16 <= len(buf):
        ln, ty, fl, seq, _ = struct.unpack_from("<IHHII", buf, i)
        if ln < 16:
            break
        yield ty, fl, seq, buf[i:i + ln]
        i += (ln + 3) & ~3

def traced(ns, cmd):
    """(direction, type, flags, seq, bytes) of every netlink message of `cmd`."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(["ip", "netns", "exec", ns, "strace", "-f", "-qq", "-s", "0",
                        "-e", "trace=sendmsg,recvmsg,sendto,recvfrom", "-e", "write=all", "-e", "read=all",
                        "-o", out.name] + cmd, check=True, stdout=subprocess.DEVNULL)
        result, chunks, direction = [], [], None
        def flush():
            if chunks:
                for m in messages(b"".join(chunks)):
                    result.append((direction,) + m)
            chunks.clear()
        for line in out:
            m = re.match(r"\d+\s+(sendmsg|recvmsg|sendto|recvfrom)\(", line)
            if m:
                flush()
                direction = ">" if m.group(1).startswith("send") else "<"
            elif re.match(r"\s*\| [0-9a-f]{5}  ", line):
                p = line.index("|") + 9
                chunks.append(bytes.fromhex(line[p:p + 49].replace(" ", "")))
        flush()
        return result

def main():
    commands = [l.strip() for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")]
    ns = "kpcap%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        if len(sys.argv) > 2:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", sys.argv[2]], check=True)
        sent, inside = [], False
        for m in traced(ns, ["nft", "-f", sys.argv[1]]):
            if m[0] == ">" and m[1] in (16, 17):  # NFNL_MSG_BATCH_BEGIN, _END
                inside = m[1] == 16
            elif m[0] == ">" and inside:
                sent.append(m)
        for cmd, (_, _, _, _, raw) in zip(commands, sent):
            print("> " + cmd)
            print(raw.hex())
        names = {0: "table", 3: "chain", 6: "rule", 9: "set", 12: "element"}
        for d, ty, _, _, raw in traced(ns, ["nft", "list", "ruleset"]):
            if d == "<" and ty >> 8 == 10 and (ty & 0xff) in names:
                print("< list " + names[ty & 0xff])
                print(raw.hex())
    finally:
        subprocess.run(["ip", "netns", "del", ns])

main()
