"""PID 1 of one simulated Spark node.

Runs inside the node's own network, mount, UTS, IPC and PID namespaces (started by
spark_cluster.sim.cluster). Gives the node private /run, /tmp, /dev/shm, docker state,
/etc/hosts, /etc/sysctl.d, /srv (models), root's ~/.bashrc, vm.swappiness and /proc/driver (where a test
gives the node an NVIDIA driver's version line: cluster.set_driver), then starts the node's own
sshd and dockerd and reaps children forever. Killing this process ends the node: the
kernel kills every process of its PID namespace (sshd, dockerd, containerd, containers).

Usage: node_init.py NODE_DIR NODE_NAME NODE_IP CGROUP_PARENT
Standard library only: it runs with the controller's interpreter before anything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


def main() -> None:
    node_dir, name, ip, cgroup_parent = sys.argv[1:5]
    sh("hostname", name)
    sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp")
    sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm")
    binds = {
        "docker": "/var/lib/docker",
        "etc-docker": "/etc/docker",
        "srv": "/srv",
        "sysctl.d": "/etc/sysctl.d",
        "hosts": "/etc/hosts",
        "hostname": "/etc/hostname",
        "resolv.conf": "/etc/resolv.conf",
        # vm.* sysctls are global to the machine: the node gets a private file instead
        "swappiness": "/proc/sys/vm/swappiness",
        "bashrc": "/root/.bashrc",
        # the kernel's driver files: empty (no NVIDIA driver), or nvidia/version as a test wrote it
        "proc-driver": "/proc/driver",
    }
    for src, dst in binds.items():
        source = os.path.join(node_dir, src)
        if os.path.isdir(source):
            os.makedirs(dst, exist_ok=True)  # e.g. /var/lib/docker on a host without docker state
        elif not os.path.exists(dst) and src in ("bashrc", "proc-driver"):
            continue  # the controller's root has no ~/.bashrc, its kernel no /proc/driver: nothing to hide
        sh("mount", "--bind", source, dst)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    os.makedirs("/run/docker", exist_ok=True)
    log = open(os.path.join(node_dir, "node.log"), "ab", buffering=0)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(node_dir, "sshd_config")], stdout=log, stderr=log, env=env)
    subprocess.Popen(
        [
            "dockerd",
            "--host", "unix:///run/docker.sock",
            "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--userland-proxy=false",
            f"--cgroup-parent={cgroup_parent}",
            "--data-root", "/var/lib/docker",
            "--exec-root", "/run/docker",
            "--pidfile", "/run/docker.pid",
            "--storage-driver", "overlay2",
        ],
        stdout=open(os.path.join(node_dir, "dockerd.log"), "ab", buffering=0),
        stderr=subprocess.STDOUT,
        env=env,
    )
    with open(os.path.join(node_dir, "init.ready"), "w") as f:
        f.write(f"{os.getpid()} {time.time()}\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:  # reap every child, adopted orphans included
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(1)


if __name__ == "__main__":
    main()
