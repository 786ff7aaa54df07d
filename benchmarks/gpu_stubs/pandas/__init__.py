"""Stand-in for the GPU check (see ../README.md): importable, unusable."""


def __getattr__(name):
    raise RuntimeError(f"pandas.{name}: pandas is a stand-in here (benchmarks/gpu_stubs)")
