"""Fault and load scenarios of `bench/faults.py`: each runs real depthsite processes on loopback and measures."""
