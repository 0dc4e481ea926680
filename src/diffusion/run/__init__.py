"""The commands (commands/), what they write about runs (reports/), and the plumbing around a job (cli, preflight,
status, lock, signals, the DDP worker). Nothing imports run/ but the entry points and the tests."""
