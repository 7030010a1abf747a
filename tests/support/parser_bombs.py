"""User data built to blow up a YAML parser, for the tests that check the
service refuses it within bounds (tests/security/test_parser_bombs.py, and
the parser's own bounds in tests/unit)."""

from __future__ import annotations


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": `width ** levels` strings from a kilobyte."""
    lines = ["#cloud-config", "a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    lines += ["write_files:", "- path: /etc/motd", f"  content: *a{levels - 1}"]
    return "\n".join(lines) + "\n"
