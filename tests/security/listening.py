"""Which TCP addresses a set of processes listens on, read from ``/proc`` (no ``ss``, no psutil)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

_LISTEN = "0A"


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state owned by one of ``pids``."""
    inodes = {_socket_inode(os.path.join(f"/proc/{pid}/fd", fd)) for pid in pids for fd in _fds(pid)}
    inodes.discard(None)
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == _LISTEN and inode in inodes:
                    found.add(_decode(local, family))
    return found


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def _fds(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []


def _socket_inode(path: str) -> str | None:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return target[len("socket:["):-1] if target.startswith("socket:[") else None


def _decode(local: str, family: int) -> tuple[str, int]:
    hex_ip, hex_port = local.split(":")
    raw = bytes.fromhex(hex_ip)
    # /proc prints the address as 32-bit words in host byte order
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    packed = struct.pack(f">{len(words)}I", *words)
    return socket.inet_ntop(family, packed), int(hex_port, 16)
