"""The command line every test worker takes, and its backend (created before TensorFlow starts)."""

import argparse

import disttrain as dt


def start(*extra: tuple[tuple, dict]):
    """Parses ``--backend --cpu-replicas --out`` (plus ``extra`` (args, kwargs) pairs) and creates the backend.

    Returns:
      ``(args, backend)``.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--cpu-replicas", type=int, default=None)
    parser.add_argument("--out", required=True)
    for flags, options in extra:
        parser.add_argument(*flags, **options)
    args = parser.parse_args()
    return args, dt.get_backend(args.backend, cpu_replicas=args.cpu_replicas)
