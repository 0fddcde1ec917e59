"""Slurm host lists (``SLURM_JOB_NODELIST``): the compressed ``gpu[07-12,20],login1`` form."""
from __future__ import annotations


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[07-12,20],login1`` -> ``gpu07``.

    What ``scontrol show hostnames`` would print first, without needing scontrol on the compute
    node: rank 0 runs there, so it is the rendezvous address (``MASTER_ADDR``)."""
    depth, item = 0, []
    for char in nodelist.strip():
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        item.append(char)
    host, rest = "", "".join(item)
    while "[" in rest:
        head, _, tail = rest.partition("[")
        ranges, _, rest = tail.partition("]")
        host += head + ranges.split(",")[0].split("-")[0]
    host += rest
    if not host:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: no host in it")
    return host
