"""The exact ``deepspeed`` launch command line, built in one place (stdlib only, no torch import).

The SLURM batch scripts call this module to build (and, in dry-run mode, print) their launch line::

    python -m mmr_core.distributed.command --num-gpus 8 --master-addr gpu01 --master-port 29500 \\
        -- packages/llava/train.py --config c.yaml

prints ``deepspeed --num_gpus=8 --master_addr=gpu01 --master_port=29500 packages/llava/train.py ...``.
With ``--null`` the arguments come out NUL-separated, for ``mapfile -d ''`` in bash.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

#: Token that a per-node wrapper replaces with ``$SLURM_NODEID`` (one srun task per node builds one
#: deepspeed launcher, which must know which slice of the hostfile's ranks it owns).
NODE_RANK_PLACEHOLDER = "__NODE_RANK__"


def deepspeed_command(
    script: str,
    script_args: Sequence[str] = (),
    *,
    launcher: Sequence[str] = ("deepspeed",),
    num_gpus: int | None = None,
    num_nodes: int | None = None,
    hostfile: str | None = None,
    include: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    node_rank: int | str | None = None,
    no_ssh: bool = False,
    module: bool = False,
) -> list[str]:
    """Build the ``deepspeed`` launcher command as an argument list.

    Args:
        script: Training script path (or module name with ``module=True``).
        script_args: Arguments passed through to the script unchanged.
        launcher: The launcher executable; ``[sys.executable, "-m", "deepspeed.launcher.runner"]``
            works inside any virtual environment, even one without the ``deepspeed`` script.
        num_gpus: Processes per node (``--num_gpus``; on a CPU-only machine: CPU processes).
        num_nodes: Number of hostfile nodes to use.
        hostfile: DeepSpeed hostfile (``host slots=N`` per line); multi-node only.
        include: Resource filter such as ``localhost:0,1`` (exclusive with ``num_gpus``).
        master_addr: Rendezvous host (rank 0's node).
        master_port: Rendezvous port.
        node_rank: This node's index in the hostfile; needs ``no_ssh``. May be
            :data:`NODE_RANK_PLACEHOLDER` for a wrapper to fill in per node.
        no_ssh: Launch only this node's processes (one launcher per node, e.g. under srun).
        module: Run ``script`` as a module (``python -m``).

    Returns:
        The argument list, ready for ``subprocess`` or ``shlex.join``.

    Raises:
        ValueError: On conflicting or incomplete arguments (named in the message).
    """
    if not script:
        raise ValueError("deepspeed_command: script must be a non-empty path or module name")
    if include and (num_gpus is not None or num_nodes is not None):
        raise ValueError("deepspeed_command: include cannot be combined with num_gpus/num_nodes")
    if node_rank is not None and not no_ssh:
        raise ValueError("deepspeed_command: node_rank only makes sense with no_ssh=True")
    if no_ssh and (hostfile is None or master_addr is None):
        raise ValueError("deepspeed_command: no_ssh needs a hostfile and a master_addr")
    cmd = list(launcher)
    if hostfile is not None:
        cmd.append(f"--hostfile={hostfile}")
    if num_nodes is not None:
        cmd.append(f"--num_nodes={num_nodes}")
    if num_gpus is not None:
        cmd.append(f"--num_gpus={num_gpus}")
    if include:
        cmd.append(f"--include={include}")
    if master_addr is not None:
        cmd.append(f"--master_addr={master_addr}")
    if master_port is not None:
        cmd.append(f"--master_port={master_port}")
    if no_ssh:
        cmd.append("--no_ssh")
    if node_rank is not None:
        cmd.append(f"--node_rank={node_rank}")
    if module:
        cmd.append("--module")
    cmd.append(script)
    cmd.extend(script_args)
    return cmd


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m mmr_core.distributed.command [options] -- SCRIPT [ARGS...]")
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1 :]
    if not rest:
        raise SystemExit("mmr_core.distributed.command: no training script after '--'")
    parser = argparse.ArgumentParser(prog="python -m mmr_core.distributed.command")
    parser.add_argument("--launcher", default="deepspeed", help="launcher command (split like a shell)")
    parser.add_argument("--num-gpus", type=int)
    parser.add_argument("--num-nodes", type=int)
    parser.add_argument("--hostfile")
    parser.add_argument("--include")
    parser.add_argument("--master-addr")
    parser.add_argument("--master-port", type=int)
    parser.add_argument("--node-rank")
    parser.add_argument("--no-ssh", action="store_true")
    parser.add_argument("--module", action="store_true")
    parser.add_argument("--null", action="store_true", help="NUL-separated output for bash mapfile -d ''")
    args = parser.parse_args(own)
    cmd = deepspeed_command(
        rest[0],
        rest[1:],
        launcher=shlex.split(args.launcher),
        num_gpus=args.num_gpus,
        num_nodes=args.num_nodes,
        hostfile=args.hostfile,
        include=args.include,
        master_addr=args.master_addr,
        master_port=args.master_port,
        node_rank=args.node_rank,
        no_ssh=args.no_ssh,
        module=args.module,
    )
    if args.null:
        sys.stdout.write("".join(f"{part}\0" for part in cmd))
    else:
        print(shlex.join(cmd))


if __name__ == "__main__":
    main()
