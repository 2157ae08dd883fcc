"""The QA node: ``python -m lung_cls.node ckpt=PATH spool=DIR forward.port=4242``.

Receives DICOM from the modality, checks lung V/Q series, forwards to the PACS or holds them;
runs until SIGTERM or Ctrl-C. Settings: conf/node.yaml; library: `lung_cls.node.server`.
"""

from __future__ import annotations

import logging
import signal
import sys

import hydra
from omegaconf import DictConfig

from lung_cls.errors import EXIT_OK, UserError, task_wrapper
from lung_cls.utils.hydra import quote_path_overrides

log = logging.getLogger("lung_cls.node")


def run(cfg: DictConfig) -> int:
    from lung_cls import __version__
    from lung_cls.node.server import Node
    from lung_cls.node.settings import NodeSettings

    settings = NodeSettings.from_config(cfg)  # cheap checks before the model loads
    # With check processes, they load the model (and say in one line if it does not load).
    ens = settings.load_ensemble() if settings.check_processes == 0 else None
    node = Node(settings, ens, version=__version__)
    try:
        node.start()
    except OSError as err:
        raise UserError(
            f"listen.port={settings.port}: cannot listen on {settings.host} ({err.strerror or err})"
        ) from None
    print(f"ready: {settings.ae_title}@{settings.host}:{node.port}", flush=True)

    def stop(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        node._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    node.wait()
    node.stop()
    return EXIT_OK


@hydra.main(version_base="1.3", config_path="../../conf", config_name="node")
@task_wrapper
def main(cfg: DictConfig) -> int:
    return run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])
    main()
