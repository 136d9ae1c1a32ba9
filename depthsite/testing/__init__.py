"""What the tests, the benchmarks and the demo scripts share: isolated sites in subprocesses, a loopback
weight mirror, photo and hostile-file builders. Never imported by the site itself; never imports `tests`."""
