#!/usr/bin/env python3
"""Heap by what holds it, from a heaptrack profile of kproxy (used by scripts/bench-api.sh).

usage: heap-breakdown.py FOLDED  (from `heaptrack_print -f PROFILE --print-flamegraph FOLDED
       --flamegraph-cost-type peak`, or `leaked` for what was live when kproxy was killed)
Stacks are attributed by the kproxy code they pass through (file names; see classify).
"""
import sys, re, collections

def has(frames, pat):
    return any(re.search(pat, f) for f in frames)

def classify(frames):
    if has(frames, r"\(kube\.rs\)") or has(frames, r"\(watcher\.rs\)"):
        if has(frames, r"\((store|convert|intern)\.rs\)"):
            return "model: Services and EndpointSlices in the store"
        if has(frames, r"\(objects\.rs\)"):
            return "Ingress objects"
        if has(frames, r"\(watcher\.rs\)") and has(frames, r"deserializ|visit_"):
            return "watcher: Kubernetes objects (list pages and events, deserialized)"
        if has(frames, r"\(watcher\.rs\)"):
            return "watcher: HTTP bodies of list pages and watches"
        return "watcher: the staged list (kproxy's buffer)"
    if has(frames, r"\(sync\.rs\)"):
        if has(frames, r"^snapshot |take_snapshot"):
            return "model: per-Service state and the sync's snapshot"
        return "dataplane: committed state and the sync's own allocations"
    if has(frames, r"\((controller|routes|proxy|tls|upstream|status)\.rs\)"):
        return "Ingress proxy"
    if has(frames, r"hyper|h2|\(client\.rs\)|body"):
        return "HTTP client/servers"
    if has(frames, r"\((health|metrics|healthcheck)\.rs\)"):
        return "health and metrics"
    return "other (runtime, threads, libraries)"

tot = collections.Counter(); grand = 0
for line in open(sys.argv[1]):
    stack, _, cost = line.rstrip("\n").rpartition(" ")
    cost = int(cost or 0)
    if cost <= 0:
        continue
    grand += cost
    tot[classify(stack.split(";"))] += cost
print(f"| where | heap |\n| --- | ---: |")
for k, v in tot.most_common():
    print(f"| {k} | {v/2**20:.1f} MiB |")
print(f"| total | {grand/2**20:.1f} MiB |")
