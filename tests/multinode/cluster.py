"""Two "nodes" on one machine: two network namespaces joined by a veth pair, each with its own address,
hostname (a UTS namespace), hosts file and sshd, for tests/multinode/test_two_nodes.py.

    node0  10.200.0.1  namespace lm<PID>n0   sshd on 10.200.0.1:22, host key of its own
    node1  10.200.0.2  namespace lm<PID>n1   sshd on 10.200.0.2:22, host key of its own

Both ends of the veth pair are called `lmnet` (each in its own namespace, as a real cluster's nodes all
have an eth0), there is no default route, and every address the tests use lies inside these namespaces:
no other machine or address is ever a target. Root logs in with a key made for the run (authorized in the
sshd configs, never in ~/.ssh); the client side is an `ssh` wrapper on PATH with its own config and
known_hosts. node1's hosts file maps its own hostname to 127.0.1.1, as Debian's does, so gloo there
advertises loopback unless GLOO_SOCKET_IFNAME reaches its ranks.

`Cluster.create()` builds it all; `cleanup(tag)` removes everything that tag made (idempotent: processes
found by `ip netns pids`, the namespaces and with them the veth pair, /etc/netns/NS, the temporary folder
with the keys, /run/sshd when this run created it). `python tests/multinode/cluster.py --cleanup TAG`
is the shell trap's sweep (tests/multinode/run.sh).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

ADDRESSES = ("10.200.0.1", "10.200.0.2")
HOSTNAMES = ("node0", "node1")
IFNAME = "lmnet"
STATE = os.path.join(tempfile.gettempdir(), "loop_megatron_2nodes_{tag}.json")


def sh(*cmd: str, check: bool = True, capture: bool = True) -> str:
    proc = subprocess.run(list(cmd), capture_output=capture, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout if capture else ""


def missing_prerequisites() -> List[str]:
    """What this machine lacks for the two-node test (root, ip netns, unshare, sshd, ssh, pdsh)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("ip", "unshare", "ssh", "ssh-keygen", "pdsh"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("/usr/sbin/sshd (openssh-server)")
    return missing


def namespaces(tag: str) -> List[str]:
    return [f"{tag}n0", f"{tag}n1"]


def netns_pids(ns: str) -> List[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cleanup(tag: str) -> None:
    """Remove everything run `tag` made; safe to call twice and after a partial setup."""
    state_path = STATE.format(tag=tag)
    state = {}
    if os.path.isfile(state_path):
        with open(state_path) as f:
            state = json.load(f)
    existing = sh("ip", "netns", "list", check=False).split()
    for ns in namespaces(tag):
        if ns not in existing:
            continue
        for _ in range(50):
            pids = netns_pids(ns)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        sh("ip", "netns", "delete", ns, check=False)
    for ns in namespaces(tag):
        shutil.rmtree(os.path.join("/etc/netns", ns), ignore_errors=True)
    if state.get("made_etc_netns"):
        try:
            os.rmdir("/etc/netns")  # only when empty: namespaces made meanwhile by others keep theirs
        except OSError:
            pass
    if state.get("made_run_sshd"):
        shutil.rmtree("/run/sshd", ignore_errors=True)
    if state.get("tmp"):
        shutil.rmtree(state["tmp"], ignore_errors=True)
    if os.path.isfile(state_path):
        os.remove(state_path)


class Cluster:
    """The two nodes of one test run; `run`/`popen` start a command inside a node (its network, hosts
    file and hostname), with the cluster's ssh wrapper first on PATH."""

    def __init__(self, tag: str, tmp: str):
        self.tag, self.tmp = tag, tmp
        self.ns = namespaces(tag)
        self.bin = os.path.join(tmp, "bin")
        self.sshd: List[subprocess.Popen] = []

    @classmethod
    def create(cls, tag: Optional[str] = None) -> "Cluster":
        tag = tag or f"lm{os.getpid()}"
        cleanup(tag)
        tmp = tempfile.mkdtemp(prefix=f"loop_megatron_2nodes_{tag}_")
        state = {"tmp": tmp, "made_run_sshd": not os.path.isdir("/run/sshd"),
                 "made_etc_netns": not os.path.isdir("/etc/netns")}
        with open(STATE.format(tag=tag), "w") as f:  # for cleanup(tag) from another process
            json.dump(state, f)
        cluster = cls(tag, tmp)
        try:
            cluster._build(state)
        except BaseException:
            cleanup(tag)
            raise
        return cluster

    def _build(self, state: Dict) -> None:
        n0, n1 = self.ns
        for ns in self.ns:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "lmv0", "netns", n0, "type", "veth", "peer", "name", "lmv1", "netns", n1)
        for ns, end, address in ((n0, "lmv0", ADDRESSES[0]), (n1, "lmv1", ADDRESSES[1])):
            sh("ip", "-n", ns, "link", "set", end, "name", IFNAME)
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", IFNAME)
            sh("ip", "-n", ns, "link", "set", IFNAME, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        hosts = {n0: f"127.0.0.1 localhost\n{ADDRESSES[0]} node0\n{ADDRESSES[1]} node1\n127.0.1.1 node0-loopback\n",
                 n1: f"127.0.0.1 localhost\n127.0.1.1 node1\n{ADDRESSES[0]} node0\n"}
        for ns, text in hosts.items():
            os.makedirs(os.path.join("/etc/netns", ns), exist_ok=True)
            with open(os.path.join("/etc/netns", ns, "hosts"), "w") as f:
                f.write(text)
        if state["made_run_sshd"]:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        key = os.path.join(self.tmp, "id_ed25519")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        known = []
        for i, (ns, address, name) in enumerate(zip(self.ns, ADDRESSES, HOSTNAMES)):
            host_key = os.path.join(self.tmp, f"host_key_{name}")
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key)
            with open(host_key + ".pub") as f:
                known.append(f"{name},{address} {' '.join(f.read().split()[:2])}\n")
            config = os.path.join(self.tmp, f"sshd_config_{name}")
            with open(config, "w") as f:
                f.write(f"ListenAddress {address}\nPort 22\nHostKey {host_key}\nPidFile {self.tmp}/sshd_{name}.pid\n"
                        f"AuthorizedKeysFile {key}.pub\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                        f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n"
                        f"X11Forwarding no\nAllowTcpForwarding no\nSubsystem sftp internal-sftp\n")
            self.sshd.append(subprocess.Popen(self._in_node(i, ["/usr/sbin/sshd", "-D", "-e", "-f", config]),
                                              stdout=subprocess.DEVNULL, stderr=open(config + ".log", "w")))
        with open(os.path.join(self.tmp, "known_hosts"), "w") as f:
            f.writelines(known)
        with open(os.path.join(self.tmp, "ssh_config"), "w") as f:
            f.write(f"Host *\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  BatchMode yes\n"
                    f"  UserKnownHostsFile {self.tmp}/known_hosts\n  GlobalKnownHostsFile /dev/null\n"
                    f"  StrictHostKeyChecking yes\n  ConnectTimeout 10\n")
        os.makedirs(self.bin)
        wrapper = os.path.join(self.bin, "ssh")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {self.tmp}/ssh_config \"$@\"\n")
        os.chmod(wrapper, 0o755)
        deadline = time.monotonic() + 20
        for name in HOSTNAMES:  # both sshd answer, from node 0, with the right hostname
            while True:
                proc = subprocess.run(self._in_node(0, ["ssh", name, "hostname"]), capture_output=True, text=True,
                                      env=self.env())
                if proc.returncode == 0 and proc.stdout.strip() == name:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd on {name} does not answer: {proc.stderr.strip()}")
                time.sleep(0.2)

    def _in_node(self, i: int, cmd: Sequence[str]) -> List[str]:
        return ["ip", "netns", "exec", self.ns[i], "unshare", "--uts", "--", "sh", "-c",
                f'hostname {HOSTNAMES[i]} && exec "$@"', "sh", *cmd]

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = self.bin + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR", "GLOO_SOCKET_IFNAME",
                    "NCCL_SOCKET_IFNAME", "DS_ENV_FILE", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                    "LOCAL_RANK"):
            env.pop(key, None)
        env.update(extra or {})
        return env

    def popen(self, i: int, cmd: Sequence[str], log: str, env: Optional[Dict[str, str]] = None,
              cwd: Optional[str] = None) -> subprocess.Popen:
        out = open(log, "w")
        return subprocess.Popen(self._in_node(i, cmd), stdout=out, stderr=subprocess.STDOUT,
                                env=self.env(env), cwd=cwd, stdin=subprocess.DEVNULL)

    def run(self, i: int, cmd: Sequence[str], log: str, env: Optional[Dict[str, str]] = None,
            cwd: Optional[str] = None, timeout: float = 300) -> int:
        proc = self.popen(i, cmd, log, env, cwd)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise

    def rank_pids(self, i: int, module: str = "loop_megatron.train") -> List[int]:
        """The trainer ranks (`python -u -m MODULE ...`) running in node i."""
        found = []
        for pid in netns_pids(self.ns[i]):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(a == "-m" and b == module for a, b in zip(argv, argv[1:])):
                found.append(pid)
        return found

    def job_pids(self, i: int) -> List[int]:
        """Processes of the job in node i: anything but its sshd listener."""
        listener = {p.pid for p in self.sshd}
        return [p for p in netns_pids(self.ns[i]) if p not in listener]

    def close(self) -> None:
        cleanup(self.tag)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cleanup":
        cleanup(sys.argv[2])
        sys.exit(0)
    print("usage: python tests/multinode/cluster.py --cleanup TAG", file=sys.stderr)
    sys.exit(2)
