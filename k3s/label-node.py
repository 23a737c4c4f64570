#!/usr/bin/env python3
"""Label a K3s node with the device class of its GPU (``zimage.io/device-class``), which the bundle's pods select on.

    python k3s/label-node.py                     # on the node: detect, print the commands
    python k3s/label-node.py --node t4-01 --apply

The class comes from quantize/device_classes.py: the class whose planner profile the detected device
covers. Detection is zimage-edge's own (``detect_device``), which asks torch for the GPU; where torch is
not installed (a node's host, usually), detect inside the agent image and pipe its facts in:

    podman run --rm --device nvidia.com/gpu=all zimage-edge/agent-cuda:0.1.0 zimage-edge device \\
        | python k3s/label-node.py --facts - --node t4-01

It prints the ``kubectl label node`` command and the K3s registration flag (``--node-label``, or the
``node-label`` entry of /etc/rancher/k3s/config.yaml) for a node not yet registered; ``--apply`` runs
the kubectl command (kubectl from PATH, with its usual kubeconfig).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from quantize.device_classes import LABEL, ClassMatch, match_class
from zimage_edge.device import GIB, DeviceFacts
from zimage_edge.errors import UsageError, ZimageEdgeError


def read_facts(source: str) -> DeviceFacts:
    """Device facts from ``zimage-edge device``'s JSON (a file, or ``-`` for stdin)."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        data = json.loads(text)
        return DeviceFacts.from_dict(data.get("device", data))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read device facts from {source} (`zimage-edge device` output): {exc}") from exc


def detect() -> DeviceFacts:
    """This machine's device, by zimage-edge's detection (torch, imported only here)."""
    from zimage_edge.device import detect_device

    try:
        return detect_device()
    except ImportError as exc:
        raise UsageError(
            f"detecting the GPU needs torch ({exc}): run `zimage-edge device` in the agent image and pass its "
            "output with --facts (see --help)"
        ) from exc


def default_node_name() -> str:
    # The kubelet (and so K3s) names a node after its host name, lower-cased, unless --node-name says otherwise.
    return socket.gethostname().strip().lower()


def label_command(node: str, match: ClassMatch) -> list[str]:
    return ["kubectl", "label", "node", node, f"{LABEL}={match.device_class}", "--overwrite"]


def describe(facts: DeviceFacts, match: ClassMatch) -> str:
    capability = ".".join(map(str, facts.compute_capability)) if facts.compute_capability else "none"
    seen = f"{facts.name} ({facts.kind}, compute capability {capability}, {facts.total_memory / GIB:.1f} GiB)"
    text = f"{seen}: device class {match.device_class} (planner profile {match.profile.name})"
    if not match.exact:
        text += f"; not the profile's own device ({match.profile.description}): it runs the pods sized for it"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", default=None, help="the node's name in Kubernetes (default: this host's name)")
    parser.add_argument("--facts", metavar="FILE", help="`zimage-edge device` output instead of detecting (- is stdin)")
    parser.add_argument("--apply", action="store_true", help="run the kubectl command (kubectl from PATH)")
    args = parser.parse_args(argv)
    try:
        facts = read_facts(args.facts) if args.facts else detect()
        match = match_class(facts)
        node = args.node or default_node_name()
        command = label_command(node, match)
        print(describe(facts, match), file=sys.stderr)
        print(shlex.join(command))
        print(f"--node-label {LABEL}={match.device_class}")
        if args.apply:
            kubectl = shutil.which("kubectl")
            if kubectl is None:
                raise UsageError("--apply needs kubectl on PATH")
            done = subprocess.run([kubectl, *command[1:]], check=False)
            if done.returncode != 0:
                raise ZimageEdgeError(f"kubectl label failed (exit status {done.returncode})")
    except UsageError as exc:
        print(f"label-node: {exc}", file=sys.stderr)
        return 2
    except ZimageEdgeError as exc:
        print(f"label-node: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
