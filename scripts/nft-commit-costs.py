#!/usr/bin/env python3
"""What one nf_tables commit costs the kernel, per layout, at a given table size: a prototype of
nftables mode's table written with nft (not kproxy), in a throwaway network namespace. Times
the batch's sendmsg (strace -T), which is the kernel's whole transaction (nft's own parsing and
cache excluded). Backs the "Kernel costs" table of docs/nftables.md. Run as root.

usage: scripts/nft-commit-costs.py old|new|fixed SIZE...
  old: a chain per Service with a cascade of dnat rules (round 1's layout)
  new: endpoints as elements of a slot map, a bucket set per endpoint count, one shared dnat chain
       (round 2's layout: a chain per Service remains, for its masquerade rule)
  fixed: the same without a chain per Service: the Service address is an element of a plain
       set that one rule of `services` looks up to goto one fixed chain (masquerade, then the
       shared dnat chain) (round 3's layout)
"""
import atexit, os, subprocess, sys, re, statistics
NS = f"kpcost{os.getpid()}"; M = 10
subprocess.run(["ip", "netns", "add", NS], check=True)
atexit.register(lambda: subprocess.run(["ip", "netns", "del", NS]))
OP = f"/tmp/{NS}.nft"
def ep(k): return f"10.{128 + k // 65536}.{(k // 256) % 256}.{k % 256}"
def cip(i): return f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
def gen(n, old=False, fixed=False):
    L=["flush ruleset","add table ip kp",
     "add chain ip kp nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }",
     "add chain ip kp nat-output { type nat hook output priority -100; policy accept; }",
     "add chain ip kp services","add chain ip kp mark-for-masquerade","add chain ip kp endpoint-dnat",
     "add map ip kp service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }",
     "add set ip kp hairpin { type ipv4_addr . ipv4_addr; }",
     "add map ip kp eps { typeof ip daddr . th dport . numgen random mod 1 : ip daddr . tcp dport; }",
     "add rule ip kp nat-prerouting jump services","add rule ip kp nat-output jump services",
     "add rule ip kp mark-for-masquerade meta mark set meta mark | 0x4000",
     "add set ip kp service-cluster-ips { type ipv4_addr . inet_proto . inet_service; }",
     "add chain ip kp service-cluster",
     "add rule ip kp service-cluster ip saddr != 10.128.0.0/9 jump mark-for-masquerade",
     "add rule ip kp service-cluster goto endpoint-dnat",
     "add rule ip kp services ip daddr . meta l4proto . th dport @service-cluster-ips goto service-cluster",
     "add rule ip kp services ip daddr . meta l4proto . th dport vmap @service-ips"]
    for b in range(1, 13):
        L.append(f"add set ip kp n{b} {{ typeof ip daddr . th dport; }}")
        L.append(f"add rule ip kp endpoint-dnat meta l4proto tcp ip daddr . th dport @n{b} dnat ip to ip daddr . th dport . numgen random mod {b} map @eps")
    els=[]; hp=[]; nb=[]; disp=[]
    for i in range(n):
        c=f"service-{i}"
        if fixed:
            els += [f"{cip(i)} . 80 . {j} : {ep(i*M+j)} . 8080" for j in range(M)]
            nb.append(f"{cip(i)} . 80")
            hp += [f"{ep(i*M+j)} . {ep(i*M+j)}" for j in range(M)]
            disp.append(f"{cip(i)} . tcp . 80")
            continue
        L.append(f"add chain ip kp {c}")
        L.append(f"add rule ip kp {c} ip daddr {cip(i)} tcp dport 80 ip saddr != 10.128.0.0/9 jump mark-for-masquerade")
        if old:
            for j in range(M):
                pick = f" numgen random mod {M-j} 0" if j < M-1 else ""
                L.append(f"add rule ip kp {c} meta l4proto tcp{pick} dnat to {ep(i*M+j)}:8080")
        else:
            L.append(f"add rule ip kp {c} goto endpoint-dnat")
            els += [f"{cip(i)} . 80 . {j} : {ep(i*M+j)} . 8080" for j in range(M)]
            nb.append(f"{cip(i)} . 80")
        hp += [f"{ep(i*M+j)} . {ep(i*M+j)}" for j in range(M)]
        disp.append(f"{cip(i)} . tcp . 80 : goto {c}")
    def chunks(name, xs):
        for k in range(0, len(xs), 2000): L.append(f"add element ip kp {name} {{ " + ", ".join(xs[k:k+2000]) + " }")
    chunks("eps", els); chunks("n10", nb); chunks("hairpin", hp); chunks("service-cluster-ips" if fixed else "service-ips", disp)
    return "\n".join(L)+"\n"
def commit(text):
    open(OP,"w").write(text)
    out=subprocess.run(["ip","netns","exec",NS,"strace","-T","-e","trace=sendmsg","nft","-f",OP],capture_output=True,text=True)
    if out.returncode: print(out.stderr[-2000:]); raise SystemExit(1)
    ts=[float(x) for x in re.findall(r"<([0-9.]+)>", out.stderr)]
    return sum(ts)*1000
for n in [int(x) for x in sys.argv[2:]]:
    old, fixed = sys.argv[1] == "old", sys.argv[1] == "fixed"
    cold = commit(gen(n, old, fixed))
    i=n-1; res={"A":[], "B":[], "C":[]}
    for r in range(15):
        new=f"10.255.{r}.1"; old_ep=ep(i*M+3) if r==0 else f"10.255.{r-1}.1"
        if old:
            h=subprocess.run(["ip","netns","exec",NS,"nft","-a","list","chain","ip","kp",f"service-{i}"],capture_output=True,text=True).stdout
            hd=re.findall(r"dnat to .* # handle (\d+)", h)[3]
            res["A"].append(commit(f"replace rule ip kp service-{i} handle {hd} meta l4proto tcp numgen random mod 7 0 dnat to {new}:8080\n"
                f"delete element ip kp hairpin {{ {old_ep} . {old_ep} }}\nadd element ip kp hairpin {{ {new} . {new} }}\n"))
        else:
            res["A"].append(commit(f"delete element ip kp eps {{ {cip(i)} . 80 . 3 }}\nadd element ip kp eps {{ {cip(i)} . 80 . 3 : {new} . 8080 }}\n"
                f"delete element ip kp hairpin {{ {old_ep} . {old_ep} }}\nadd element ip kp hairpin {{ {new} . {new} }}\n"))
            # N change: 10 -> 11 -> 10 (bucket move + one slot)
            a, b = (10, 11) if r % 2 == 0 else (11, 10)
            slot = f"delete element ip kp eps {{ {cip(i)} . 80 . 10 }}\n" if a == 11 else f"add element ip kp eps {{ {cip(i)} . 80 . 10 : 10.254.0.1 . 8080 }}\n"
            res["B"].append(commit(f"delete element ip kp n{a} {{ {cip(i)} . 80 }}\nadd element ip kp n{b} {{ {cip(i)} . 80 }}\n" + slot))
        # new Service (and its removal): validation
        k=n+r; c=f"service-{k}"
        if fixed:
            res["C"].append(commit(f"add element ip kp eps {{ " + ", ".join(f"{cip(k)} . 80 . {j} : {ep(k*M+j)} . 8080" for j in range(M))
                + f" }}\nadd element ip kp n10 {{ {cip(k)} . 80 }}\nadd element ip kp service-cluster-ips {{ {cip(k)} . tcp . 80 }}\n"))
            continue
        body=f"add chain ip kp {c}\nadd rule ip kp {c} ip daddr {cip(k)} tcp dport 80 ip saddr != 10.128.0.0/9 jump mark-for-masquerade\n"
        if old:
            body+="".join(f"add rule ip kp {c} meta l4proto tcp{(f' numgen random mod {M-j} 0' if j<M-1 else '')} dnat to {ep(k*M+j)}:8080\n" for j in range(M))
        else:
            body+=f"add rule ip kp {c} goto endpoint-dnat\nadd element ip kp eps {{ " + ", ".join(f"{cip(k)} . 80 . {j} : {ep(k*M+j)} . 8080" for j in range(M)) + f" }}\nadd element ip kp n10 {{ {cip(k)} . 80 }}\n"
        body+=f"add element ip kp service-ips {{ {cip(k)} . tcp . 80 : goto {c} }}\n"
        res["C"].append(commit(body))
    fmt=lambda xs: f"{statistics.median(xs):.2f}/{max(xs):.2f}" if xs else "-"
    print(f"{sys.argv[1]} n={n}: cold start sendmsg {cold:.0f} ms; endpoint change {fmt(res['A'])} ms; N change {fmt(res['B'])} ms; new Service {fmt(res['C'])} ms (median/max)", flush=True)
