"""``python -m diptych.services.prefill_worker``: run one prefill worker."""

from diptych.proto.roles import WorkerRole
from diptych.services.worker.main import worker_main


def main(argv: list[str] | None = None) -> None:
    worker_main("prefill", "Diptych prefill worker: chunked prefill under the batch policy's token budget; emits "
                "each request's first token and pushes its KV to the decode worker that reserved room for it.",
                WorkerRole.PREFILL, argv=argv)


if __name__ == "__main__":
    main()
