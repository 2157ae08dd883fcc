"""Release or discard a series the node holds in quarantine, and record who did it and when.

    python -m lung_cls.node.release --spool DIR list
    python -m lung_cls.node.release --spool DIR show SERIES_UID
    python -m lung_cls.node.release --spool DIR release SERIES_UID [--by NAME] [--note TEXT]
    python -m lung_cls.node.release --spool DIR discard SERIES_UID --reason TEXT [--by NAME]

``release`` queues the series (and the node's report on it) for the PACS: the running node - or
the next one started on this spool - forwards it. ``discard`` deletes its files from the spool;
the audit rows stay, with the state ``discarded``. ``--by`` defaults to the login name. Both are
one transaction on the audit log and an entry in its ``events`` table.
"""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Sequence
from pathlib import Path

from lung_cls.errors import UserError, task_wrapper
from lung_cls.node import audit as A
from lung_cls.node.audit import Audit, now_iso
from lung_cls.node.spool import INCOMING, Spool


def open_spool(spool: str) -> tuple[Spool, Audit]:
    root = Path(spool).expanduser()
    if not (root / A.AUDIT_NAME).is_file():
        raise UserError(f"{root}: no audit log ({A.AUDIT_NAME}) here: is this the node's spool?")
    return Spool(root), Audit(root / A.AUDIT_NAME)


def held_series(audit: Audit) -> list[dict]:
    return audit.query(
        "SELECT series_instance_uid AS series, MIN(patient_id) AS patient_id, COUNT(*) AS n, "
        "MIN(status) AS status, MIN(declared) AS declared, MIN(predicted) AS predicted, "
        "MIN(prob_perfusion) AS prob_perfusion, MIN(held_reason) AS held_reason, "
        "MIN(checked_at) AS held_at FROM instances WHERE state = ? AND report_for IS NULL "
        "GROUP BY series_instance_uid ORDER BY held_at",
        (A.HELD,),
    )


def _rows(audit: Audit, series: str) -> list[dict]:
    return audit.query(
        "SELECT * FROM instances WHERE (series_instance_uid = ? OR report_for = ?) AND state = ?",
        (series, series, A.HELD),
    )


def release(spool: Spool, audit: Audit, series: str, who: str, note: str | None = None) -> int:
    """Queue a held series (and its report) for the PACS; returns the number of instances."""
    rows = _rows(audit, series)
    if not rows:
        raise UserError(f"series {series}: not held in {spool.root} (see `list`)")
    moved = {
        r["sop_instance_uid"]: spool.move(
            r["file"], INCOMING, r["series_instance_uid"], r["sop_instance_uid"]
        )
        for r in rows
    }
    now = now_iso()
    with audit.tx() as db:
        for r in rows:
            db.execute(
                "UPDATE instances SET state=?, file=?, released_by=?, released_at=?, "
                "release_action='released' WHERE sop_instance_uid=? AND state=?",
                (A.QUEUED, moved[r["sop_instance_uid"]], who, now, r["sop_instance_uid"], A.HELD),
            )
        audit.event(db, series, "released", who, note)
    return len(rows)


def discard(spool: Spool, audit: Audit, series: str, who: str, reason: str) -> int:
    """Delete a held series' files from the spool (rows stay, state ``discarded``)."""
    rows = _rows(audit, series)
    if not rows:
        raise UserError(f"series {series}: not held in {spool.root} (see `list`)")
    now = now_iso()
    with audit.tx() as db:
        for r in rows:
            db.execute(
                "UPDATE instances SET state=?, released_by=?, released_at=?, "
                "release_action='discarded' WHERE sop_instance_uid=? AND state=?",
                (A.DISCARDED, who, now, r["sop_instance_uid"], A.HELD),
            )
        audit.event(db, series, "discarded", who, reason)
    for r in rows:  # after the commit: a crash here leaves a file, never a held row without one
        spool.remove(r["file"])
    return len(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lung_cls.node.release",
        description="List, release or discard series the QA node holds in quarantine.",
    )
    p.add_argument("--spool", required=True, help="the node's spool folder")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="held series, oldest first")
    show = sub.add_parser("show", help="the audit rows of one series")
    show.add_argument("series")
    for name, text in (("release", "forward a held series to the PACS"),
                       ("discard", "delete a held series from the spool")):  # fmt: skip
        c = sub.add_parser(name, help=text)
        c.add_argument("series", help="SeriesInstanceUID (see `list`)")
        c.add_argument("--by", default=None, help="who decides (default: the login name)")
        if name == "release":
            c.add_argument("--note", default=None, help="why (kept in the events table)")
        else:
            c.add_argument("--reason", required=True, help="why (kept in the events table)")
    return p


@task_wrapper
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    spool, audit = open_spool(args.spool)
    try:
        if args.command == "list":
            rows = held_series(audit)
            if not rows:
                print("nothing held")
            for r in rows:
                prob = "" if r["prob_perfusion"] is None else f" P(perf)={r['prob_perfusion']:.3f}"
                print(
                    f"{r['series']}  patient {r['patient_id']}  {r['n']} instance(s)  "
                    f"{r['status']}: declared {r['declared']}, predicted {r['predicted']}{prob}  "
                    f"held {r['held_at']}  ({r['held_reason']})"
                )
        elif args.command == "show":
            rows = audit.query(
                "SELECT * FROM instances WHERE series_instance_uid = ? OR report_for = ?",
                (args.series, args.series),
            )
            if not rows:
                raise UserError(f"series {args.series}: not in the audit log of {spool.root}")
            for r in rows:
                print("  ".join(f"{k}={v}" for k, v in r.items() if v is not None))
        else:
            who = args.by or getpass.getuser()
            if args.command == "release":
                n = release(spool, audit, args.series, who, args.note)
                print(f"released {n} instance(s) of {args.series} by {who}: queued for the PACS")
            else:
                n = discard(spool, audit, args.series, who, args.reason)
                print(f"discarded {n} instance(s) of {args.series} by {who}")
    finally:
        audit.close()
    return 0


if __name__ == "__main__":
    main()  # task_wrapper turns errors and codes into the exit status
