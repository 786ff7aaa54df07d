"""Stand-in for the GPU check (see ../README.md): importable, unusable."""


def _absent(*args, **kwargs):
    raise RuntimeError("datasets is a stand-in here (benchmarks/gpu_stubs): the GPU check loads no datasets")


load_dataset = _absent


class Dataset:  # noqa: D101 - named in transformer-lens's type hints only
    def __init__(self, *args, **kwargs):
        _absent()


class IterableDataset(Dataset):
    pass
