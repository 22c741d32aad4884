"""Launch-plumbing probe: joins the process group the way train.py does, all-reduces, reports.

Each rank writes PROBE_OUT_DIR/rank<R>.json. PROBE_FAIL_RANK=R makes rank R exit with an error
after joining, as a crashing trainer would.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from marjara.distributed import ensure_process_group, exit_now, shutdown  # noqa: E402

ensure_process_group()
rank, world_size = dist.get_rank(), dist.get_world_size()
if os.environ.get("PROBE_FAIL_RANK") == str(rank):
    raise SystemExit(f"launch_probe: rank {rank} fails on purpose")

total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
report = {
    "rank": rank,
    "world_size": world_size,
    "all_reduce": total.item(),
    "local_rank": os.environ.get("LOCAL_RANK"),
    # DeepSpeed's launcher calls the node rank CROSS_RANK, torchrun GROUP_RANK.
    "node_rank": os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK")),
    "master_addr": os.environ.get("MASTER_ADDR"),
    "master_port": os.environ.get("MASTER_PORT"),
    "ssh_server": (os.environ.get("SSH_CONNECTION", "").split() or [None] * 3)[2],
    "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
    "path": os.environ.get("PATH"),
    "args": sys.argv[1:],
}
out_dir = Path(os.environ["PROBE_OUT_DIR"])
(out_dir / f"rank{rank}.json").write_text(json.dumps(report))
shutdown()
exit_now(0)
