import os

# Tests start their own local clusters: no token authentication, no usage reporting.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray runs every worker process (each actor) at niceness 15. Beside any busy process at 0 (issue 17's
# run under load: two spinners) the actors then get a sliver of a core: the main job took 164 s
# to start instead of 13 s, and the short chaos test never reached its training budget. At 0 they
# compete as equals (20.5 s; the chaos test passed with 26 strikes). At idle it changes nothing.
# Every Ray the tests start (ray.init, `ray start` in the emulated cluster, the scripts and jobs
# they run) inherits it from here. The product keeps Ray's default.
os.environ.setdefault("RAY_worker_niceness", "0")
