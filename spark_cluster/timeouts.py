"""Every fixed time limit of spark-cluster in one place, each with why it is what it is (the
simulated cluster's own, spark_cluster/sim/, stay there). What a user may want to change lives in
cluster.yaml: ssh.*_timeout_s, health.*, watchdog.*, gateway.*, vllm.check_timeout_s."""

# Small node commands (take or release the lock, read a process, the last log lines or an engine start's): they
# answer in well under a second; 30 s allows for a node under heavy load (a model loading).
QUICK_S = 30
# A container's whole log (saved by down and into incident bundles): megabytes over SSH.
LOG_DUMP_S = 120
# `docker pull` of the image, or `docker save | docker load` through the controller: images for
# Sparks are 10-25 GB, and the management link may be 1 GbE or WiFi.
IMAGE_TRANSFER_S = 3600
BANDWIDTH_S = 300  # the all-reduce test: containers start, torch imports, ranks meet (60 s), 10 rounds
SYNC_S = 4 * 3600  # one model copy between two nodes (63 GB: about a minute over the ConnectX-7 link, 10 over 1 GbE)
# Removing a throwaway container (the vLLM flag check's, after it timed out).
CLEANUP_S = 60
# Beyond a container's stop timeout: docker's own stop and removal of a big container.
REMOVE_EXTRA_S = 60
# Beyond a hosted process's stop timeout: `docker exec` into a busy container.
PROCESS_STOP_EXTRA_S = 30
# Asking Ray for its state inside the head container: the probe imports Ray (1-3 s of CPU on the head).
RAY_STATE_S = 60
# The watchdog's node probe: health.probe_timeout_s plus this for SSH and docker on a loaded node.
NODE_PROBE_EXTRA_S = 5
# Host facts (docker ps, free, uptime) in an incident bundle, asked of every node at once: the
# restart waits for them, and they answer in a fraction of a second unless the node is in trouble.
INCIDENT_S = 5
# How often `up` polls a starting process for its PID file, and for how long: `docker exec -d`
# returns at once, the process writes its PID within a second unless something is wrong.
PROCESS_POLL_S = 0.5
PROCESS_START_S = 20
# How long an engine's leftover processes (SIGKILLed) may take to vanish before a new engine starts in
# their container: past it they are stuck in the kernel (a wedged GPU), and the container must go
ENGINE_GONE_S = 10
# A kept restart: how long Ray may take to release the ranks of the engine that was killed (its
# placement group removed) before the full restart is the way back instead (seconds on a sound cluster)
RAY_RELEASE_S = 30
# a node's cache folder before an engine start: every file listed, what changed since the seal moved aside
CACHE_CHECK_S = 120
# sealing it once the engine is ready: every file hashed (SHA-256 at ~1 GB/s: a few GB of kernels)
CACHE_SEAL_S = 900
# How often `up` asks vLLM whether it is ready (/health, /v1/models, a completion): a local HTTP
# request costs nothing next to a model load, and every second of polling slack is a second of a
# restart. (Ray's membership is polled at health.poll_interval_s: each poll imports Ray on the head.)
READY_POLL_S = 0.25
# Stop timeout of a Ray worker container (capped): it keeps nothing worth a graceful stop, and its
# `ray start --block` waits out the whole stop timeout once the head is gone.
RAY_WORKER_STOP_S = 5
# Asking Ray for `status`: shorter than an up's wait, status must answer quickly.
RAY_STATUS_S = 20
# `logs -f` runs until Ctrl-C: a week, as far as the node's own limit is concerned.
FOLLOW_LIMIT_S = 7 * 24 * 3600
# A chat completion of the simulated cluster's demo (a tiny model on CPU).
DEMO_COMPLETION_S = 120
# The gateway asks vLLM's /health whether a 500 came from a dying engine: a live one answers at once.
ENGINE_HEALTH_S = 5
# The controller's shutdown: the watchdog thread ends its period (a restart in progress is left to
# the next controller, which confirms what it finds); open streams get this long to finish.
CONTROLLER_STOP_S = 60
GRACEFUL_SHUTDOWN_S = 5
# The controller's /api/status is gathered over SSH (about a second): one gather serves every reader this long.
STATUS_CACHE_S = 2.0
SPEED_LOOK_S = 5.0  # how often the controller looks at each group's decode speed (spark_cluster.speed_watch)
# A server-sent event stream (/api/events) with nothing to say sends a comment this often, so
# proxies and browsers keep it open.
EVENT_STREAM_KEEP_ALIVE_S = 15
# A command past its timeout gets SIGTERM on the node, then SIGKILL this much later.
REMOTE_KILL_AFTER_S = 5
# The controller gives up waiting this much after the node should have ended the command.
LOCAL_GRACE_S = 10
# OpenSSH sends a command's exit status when the command ends, which can be before the last of its
# output has left its pipes (RFC 4254 lets exit-status come any time before the channel closes): the
# output is whole at the channel's EOF. A command whose background child holds its output open never
# lets EOF come: after the exit status, EOF is awaited this long.
OUTPUT_AFTER_EXIT_S = 2.0
# `sync`: the receiver on a node says which port it listens on within this.
SYNC_LISTENING_S = 30.0
# Ray marks a frozen node dead only after ~30-80 s of missed health checks: the watchdog asks Ray
# at most this often (each probe imports Ray on the head), the hang itself is caught sooner by
# progress and the ranks.
RAY_PROBE_INTERVAL_S = 15.0
# A flag check with a local parser-only environment (vLLM's import: 5-30 s, more on a busy machine).
LOCAL_CHECK_S = 600
# Each pip step building a parser-only environment (PyTorch's CPU wheel alone is about 200 MB).
VLLM_ENV_STEP_S = 1800
# A client's kept-alive connection to the gateway with no request: closed after this (as uvicorn's default).
GATEWAY_KEEP_ALIVE_S = 5
# While request bodies wait for room (gateway.max_buffered spent), one that has not arrived any further
# for this long gives its room back (408): a client sending its body does not pause for seconds.
BODY_STALL_S = 2.0
# A request to the control plane must be whole this long after its first byte (blank lines included):
# its requests are small and come from this machine or a tunnel.
CONTROL_REQUEST_S = 10
# A wrong API token is answered this long after it came, one after another: guessing goes at 2 a second
# at most; a person who mistyped does not notice.
FAILED_TOKEN_S = 0.5

# `up` asks whether this cluster's controller serves (then the change rolls through it): on loopback
# by default, an answer comes at once or not at all.
CONTROLLER_PROBE_S = 3
