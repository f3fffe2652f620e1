"""Entry points, one per stage: `python -m launch.<stage> --config=<name>`."""
import sys


def run(main) -> None:
    """Run a launcher's `main`. Missing inputs (a tokenizer, shards, a checkpoint) end the process
    with their message and exit code 1 instead of a traceback; a NaN/inf loss exits 3 (the last
    good checkpoint kept); other errors keep their traceback."""
    try:
        code = main()
    except Exception as err:
        from nanochat_jax.train import NonFiniteLoss
        if isinstance(err, NonFiniteLoss):
            print(err, file=sys.stderr, flush=True)
            sys.exit(3)
        from nanochat_jax.checkpoint import CheckpointError  # imported only on failure: orbax is slow to load
        if isinstance(err, (FileNotFoundError, CheckpointError)):
            sys.exit(f"error: {err}")
        raise
    sys.exit(code if isinstance(code, int) else 0)
