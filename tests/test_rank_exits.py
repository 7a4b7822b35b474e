"""Every script that starts a process group ends its rank through ``megakto.distributed.comm``
(``run_rank``, ``exit_process``, ``shutdown`` or ``abort``) or skips the teardown (``os._exit``), never by falling off the end of the
interpreter: a rank that exits with its gloo/NCCL group alive can abort in a C++ destructor at
interpreter exit (``terminate called without an active exception``), turning a finished run's status
0 into 250 at random. Checked by reading the sources (nothing is executed)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STARTS_GROUP = re.compile(r"\binit_distributed\(|\binit_process_group\(")
# comm's exits; the process group torn down by hand; or no interpreter teardown at all (os._exit)
ENDS_RANK = re.compile(r"\bcomm\.(run_rank|exit_process|shutdown|abort)\(|\bdestroy_process_group\(|\bos\._exit\(")


def _scripts():
    for folder in ("launch", "tools", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            if '__name__ == "__main__"' in text and STARTS_GROUP.search(text):
                yield path, text


def test_scripts_that_start_a_process_group_end_the_rank_through_comm():
    scripts = dict(_scripts())
    # the scripts this guards (a sample, so a broken pattern cannot pass vacuously)
    assert {"tests/checkpoint/_ep_checkpoint_worker.py", "tools/probe_zero3_gathers.py"} <= {
        str(p.relative_to(ROOT)) for p in scripts}
    bare = [str(p.relative_to(ROOT)) for p, text in scripts.items() if not ENDS_RANK.search(text)]
    assert not bare, f"these scripts start a process group but leave through the interpreter's teardown: {bare}"
