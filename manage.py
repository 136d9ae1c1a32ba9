#!/usr/bin/env python
"""Django's command-line utility for depthsite."""
import gc
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "depthsite.settings")
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    finally:
        # The command is done: skip the interpreter's final collection over every object a loaded network
        # left (seconds after a predict with torch imported); the OS frees the memory at exit anyway.
        gc.freeze()


if __name__ == "__main__":
    main()
