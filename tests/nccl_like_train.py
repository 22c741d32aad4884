"""train.py under the NCCL-like group of tests/nccl_like.py; each rank writes how many of its
collectives went through the helper to OUT_DIR/nccl_like_rank<R>.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/nccl_like_train.py TRAIN_FLAGS...
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nccl_like  # noqa: E402
import train  # noqa: E402
from marjara.distributed import exit_now  # noqa: E402

nccl_like.install()
argv = sys.argv[1:]
code = train.main(argv)
out_dir = Path(argv[argv.index("--out_dir") + 1])
rank = os.environ.get("RANK", "0")  # the process group is gone by now
(out_dir / f"nccl_like_rank{rank}.json").write_text(json.dumps(nccl_like.served))
exit_now(code)
