"""The `tierguard` command line (`main`) and its admin commands."""

from gateway.cli.main import main

__all__ = ["main"]
