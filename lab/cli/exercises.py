"""`ambient-lab ex ...`: the graded exercises, from the command line (a client of lab/course)."""

from __future__ import annotations

import argparse
import os
import sys

from lab.common.errors import LabError

USAGE = """\
The course, in order (like rustlings, graded against your live lab):
  ambient-lab ex list                 the exercises and your progress
  ambient-lab ex start [NAME]         the task, and a lab of its own in its starting state
  ambient-lab ex check [NAME]         every check, with what was observed and how to see it yourself
  ambient-lab ex hint [NAME]          the next hint; after the last, hints computed from your lab
  ambient-lab ex answer NAME VALUE    for exercises that ask a question
  ambient-lab ex watch                re-check on every save or lab change; move on when it passes
  ambient-lab ex reset NAME|--all     the stub and the lab as they were (--all: forget all progress)
  ambient-lab ex solution NAME        the reference answer, once done (or --force)
NAME is an exercise's name, number or topic: 01_enrol, 1 or enrol (default: the current one)."""


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ex", help="the graded exercises: list, start, check, hint, answer, watch, reset, solution",
                       description="The graded exercises.", epilog=USAGE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["list", "start", "check", "hint", "answer", "watch", "reset", "solution"])
    p.add_argument("exercise", nargs="?", metavar="NAME")
    p.add_argument("value", nargs="?", metavar="VALUE", help="with answer: your answer")
    p.add_argument("--all", action="store_true", help="with reset: forget all progress")
    p.add_argument("--force", action="store_true", help="with solution: show it before the exercise is done")
    p.set_defaults(func=cmd_ex)


def cmd_ex(args: argparse.Namespace) -> int:
    from lab.course import runner

    course = runner.Course.load()
    if args.action == "list":
        rows, summary = runner.list_rows(course)
        widths = [max(len(r[i]) for r in rows + [["NAME", "KIND", "STATUS", "CONCEPT", ""]]) for i in range(4)]
        print("  ".join(h.ljust(w) for h, w in zip(["NAME", "KIND", "STATUS", "CONCEPT"], widths)) + "  TASK")
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        print(f"\n{summary}. Next: sudo ambient-lab ex start")
        return 0
    if args.action == "reset" and args.all:
        course.progress.path.unlink(missing_ok=True)
        print("progress cleared")
        return 0
    ex = course.find(args.exercise)
    if args.action != "solution" and os.geteuid() != 0:
        raise LabError(f"ambient-lab ex {args.action} needs root: it reads and changes the exercise's lab",
                       f"run it with sudo: sudo ambient-lab ex {args.action} {ex.name}")
    if args.action == "start":
        runner.start(course, ex)
    elif args.action == "check":
        return 0 if runner.check(course, ex) else 1
    elif args.action == "hint":
        print("\n".join(runner.hint(course, ex)))
    elif args.action == "answer":
        if args.value is None:
            raise LabError("no answer given", f"ambient-lab ex answer {ex.name} VALUE")
        runner.answer(course, ex, args.value)
        print(f"answer recorded for {ex.name}; now: sudo ambient-lab ex check {ex.name}")
    elif args.action == "watch":
        try:
            runner.watch(course)
        except KeyboardInterrupt:
            print("", file=sys.stderr)
    elif args.action == "reset":
        runner.reset(course, ex)
    elif args.action == "solution":
        print(runner.solution(course, ex, args.force))
    return 0
