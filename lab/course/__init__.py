"""The course: graded exercises run against the live lab (`ambient-lab ex ...`).

Like rustlings, the exercises are an ordered manifest (`exercises/course.yaml`) with a folder per
exercise (its task, its scenario, its stub) and the reference answers kept apart in
`solutions/`. Unlike it, every check reads the learner's own running lab (the kernel's rules,
the components, real traffic), each failing check comes with a hint computed from that lab, and a
"build it" exercise plugs the learner's function into a running component (lab/common/seams.py).

`manifest` (loading and validating the course), `live` (reading a running lab as kubectl and
istioctl would), `checks` (the declarative checks and their live hints), `answers` (values an
exercise asks for, computed from the learner's lab), `progress` (the progress file), `runner`
(start, check, hint, reset, answer, solution, watch). The CLI (`lab/cli/exercises.py`) and the TUI
are clients of `runner`.
"""
