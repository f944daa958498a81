"""A process the tracking tests kill with SIGKILL: an install cut into small day ranges, or a
drain (of the shipped configuration, or of the one at the path after the URL). It prints a line
when each range is done, so the test knows where it is."""

from __future__ import annotations

import sys

from sqlalchemy import create_engine

from retention_pipeline.config.loader import load_config
from retention_pipeline.tracking import install as install_module
from retention_pipeline.tracking.drain import update_rollup
from retention_pipeline_tests.helpers import make_config


def main() -> None:
    action, url = sys.argv[1], sys.argv[2]
    config = (
        load_config(sys.argv[3]) if action == "drain" and len(sys.argv) > 3 else make_config(url)
    )
    engine = create_engine(url)
    if action == "install":
        install_module.REBUILD_CHUNK_ROWS = int(sys.argv[3])
        install_module.install(engine, config, progress=lambda line: print(line, flush=True))
    else:
        update_rollup(engine, config)
    print("done", flush=True)


if __name__ == "__main__":
    main()
